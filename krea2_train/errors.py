"""The errors a user fixes from their message, and how the command-line entry points report them.

An error class that derives from :class:`Krea2Error` names the problem and what to do (a corrupt
checkpoint, another model's LoRA, an unreachable database, a full disk): ``krea2`` and
``python -m krea2_train`` print it as ``PROG: error: MESSAGE`` and exit 1, without a traceback.
Anything else is a bug and keeps its traceback; ``KREA2_TRACEBACK=1`` shows one for every error.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 1
# the file problems a user fixes (space, permissions, a path that is not there), not bugs
USER_FILE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ELOOP}
)


class Krea2Error(Exception):
    """An error whose message tells the user what is wrong and what to do.

    ``retryable``: whether a restart may succeed without the user's help (a database that comes
    back); False for what every restart meets again (a foreign checkpoint, a bad setting).
    """

    retryable = False


class ArgumentParser(argparse.ArgumentParser):
    """argparse with an argument error as one line, ``PROG: error: MESSAGE (PROG --help: usage)``,
    exit 2: the usage block is one ``--help`` away, not printed above the message. Its
    subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help: usage)\n")

    def parse_args(self, args=None, namespace=None):
        """Unknown arguments are reported by the deepest subcommand chosen (argparse hands a
        subparser's leftovers up to the top parser, whose help does not list them)."""
        namespace, unknown = self.parse_known_args(args, namespace)
        if unknown:
            parser = self
            while True:
                choices = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
                chosen = None if choices is None else choices.choices.get(getattr(namespace, choices.dest, None))
                if chosen is None:
                    break
                parser = chosen
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        return namespace


class UsageError(Krea2Error):
    """A command-line argument or setting that cannot work (a bad value, a missing option, a model
    directory holding another kind of model): the message names it."""


class MissingPathError(Krea2Error, FileNotFoundError):
    """A path that a setting or an argument names and that is not there, or is not what it must be
    (a model directory without its config): the message names the setting and the path. Also a
    ``FileNotFoundError``, for callers that catch that."""


def is_lasting_error(error: BaseException) -> bool:
    """A user error that a restart would meet again (see :func:`record_user_error`)."""
    return isinstance(error, Krea2Error) and not error.retryable


def is_user_error(error: BaseException) -> bool:
    """A :class:`Krea2Error`, or a file error (out of space, read-only, permission, missing path) on a named file."""
    if isinstance(error, Krea2Error):
        return True
    return isinstance(error, OSError) and error.errno in USER_FILE_ERRNOS and error.filename is not None


USER_ERROR_RECORD = "user_error.txt"  # in the run directory: the launchers do not restart what fails this way again


def record_user_error(run_dir: str | os.PathLike, error: BaseException) -> None:
    """Write ``run_dir/user_error.txt``: the run stopped on an error that a restart would meet
    again (a foreign checkpoint, a bad setting), so ``launch/slurm/run_training.sh`` does not
    resubmit it. Best effort: the error itself may be that the run directory cannot be written."""
    from krea2_train.files import write_text

    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_text(Path(run_dir) / USER_ERROR_RECORD, f"{type(error).__name__}: {error}\n")
    except OSError:
        logger.warning("could not record the error in %s", run_dir, exc_info=True)


def clear_user_error(run_dir: str | os.PathLike) -> None:
    """Remove the record of an earlier start's error (each start decides afresh)."""
    (Path(run_dir) / USER_ERROR_RECORD).unlink(missing_ok=True)


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


def compile_patterns(patterns: Iterable[str], what: str, error: type[Exception]) -> list[re.Pattern]:
    """``patterns`` (regular expressions a user gave for ``what``), compiled; the first that does
    not compile raises ``error`` naming it and ``what``."""
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as reason:
            raise error(f"{what}: {pattern!r} is not a regular expression ({reason})") from None
    return compiled
