"""The errors a user fixes from their message, and how the command-line entry points report them.

An error class that derives from :class:`Krea2Error` names the problem and what to do (a corrupt
checkpoint, another model's LoRA, an unreachable database, a full disk): ``krea2`` and
``python -m krea2_train`` print it as ``PROG: error: MESSAGE`` and exit 1, without a traceback.
Anything else is a bug and keeps its traceback; ``KREA2_TRACEBACK=1`` shows one for every error.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import Callable

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 1
# the file problems a user fixes (space, permissions, a path that is not there), not bugs
USER_FILE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.EISDIR, errno.ENOTDIR})


class Krea2Error(Exception):
    """An error whose message tells the user what is wrong and what to do."""


def is_user_error(error: BaseException) -> bool:
    """A :class:`Krea2Error`, or a file error (out of space, read-only, permission, missing path) on a named file."""
    if isinstance(error, Krea2Error):
        return True
    return isinstance(error, OSError) and error.errno in USER_FILE_ERRNOS and error.filename is not None


def report_user_errors(prog: str, func: Callable[[], int]) -> int:
    """Run ``func``; a user error is printed as ``PROG: error: MESSAGE`` and gives exit code 1."""
    try:
        return func()
    except Exception as error:
        if not is_user_error(error) or os.environ.get("KREA2_TRACEBACK") == "1":
            raise
        logger.debug("user error", exc_info=True)
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
