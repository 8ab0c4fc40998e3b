"""Publishing a file: write it under a temporary name, then rename it into place.

The rename is atomic, so a reader never finds half a file under the final name. A durable publish
also fsyncs the file before the rename and its directory after it, so a file that was renamed into
place still holds its bytes after a power loss or a node crash (without the fsyncs, a journaling
file system may commit the rename before the data, leaving an empty or short file under the final
name). Durable is the default; files a reader can recompute and that are written often (heartbeats,
conditioning-cache entries) skip the fsyncs.

Every writer of shards, manifests, exports and run records publishes through this module; the
checkpoint commit (a directory rename, ``train/checkpoint.py``) uses :func:`fsync_path` the same way.
The appended logs (``metrics.jsonl``, the run log, sample ids) are written with :func:`append_line`
(a record after a line torn by a crash starts a line of its own) and read back with
:func:`read_json_lines` (the torn line is skipped);
shards and checkpoints check their files' bytes with :func:`file_sha256`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["append_line", "file_sha256", "fsync_path", "publish", "published", "read_json_lines", "temporary_path", "write_text"]


def temporary_path(path: str | os.PathLike) -> Path:
    """The name ``path`` is written under before it is published: a sibling unique to this process,
    so ranks or workers writing the same file never share one."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data, or a directory's entries, to stable storage."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def publish(temporary: str | os.PathLike, path: str | os.PathLike, *, durable: bool = True) -> Path:
    """Rename the finished ``temporary`` to ``path`` (replacing what is there), fsyncing the data
    first and the directory after when ``durable``."""
    path = Path(path)
    if durable:
        fsync_path(temporary)
    os.replace(temporary, path)
    if durable:
        fsync_path(path.parent)
    return path


@contextmanager
def published(path: str | os.PathLike, *, durable: bool = True) -> Iterator[Path]:
    """Write the file ``path`` under the temporary name this yields; it is published when the
    block ends, and removed instead if the block raises (nothing is left behind)."""
    temporary = temporary_path(path)
    try:
        yield temporary
        publish(temporary, path, durable=durable)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str, *, durable: bool = True) -> Path:
    """Publish ``text`` as the file ``path`` (UTF-8)."""
    with published(path, durable=durable) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def append_line(path: str | os.PathLike, line: str, *, durable: bool = False) -> None:
    """Append ``line`` and a newline to a JSON-lines log in one write on an ``O_APPEND``
    descriptor (writers on several ranks do not interleave), fsynced when ``durable``. A log whose
    last line was torn by a crash (no newline at its end) gets one first, so the torn line stays
    the only one lost: appended to it, the new record would be skipped with it."""
    descriptor = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(descriptor).st_size
        torn = size > 0 and os.pread(descriptor, 1, size - 1) != b"\n"
        os.write(descriptor, (("\n" if torn else "") + line + "\n").encode())
        if durable:
            os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_json_lines(path: str | os.PathLike) -> list[Any]:
    """The records of a JSON-lines log (``[]`` when there is none); a line torn by a crash or a
    full disk is skipped, so a report on a run that died mid-write still reads."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():  # a torn multi-byte character too
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """The SHA-256 of a file's bytes, read ``chunk_bytes`` at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
