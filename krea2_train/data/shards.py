"""Training shards: Arrow IPC files of pre-resized images with their captions.

One shard holds samples of one resolution and one aspect-ratio bucket, already shuffled when
packed. Rows live in record batches of a few dozen rows, so a reader memory-maps the file and
reads any row without touching the others.

Columns (one row per sample):

    sample_id       int64    the ``images.id`` of the sample
    image           binary   encoded image (PNG, lossless WebP, or JPEG), exactly the bucket size
    image_crc32     uint32   CRC-32 of ``image``, checked on every read
    caption_long    string
    caption_medium  string   may be empty
    caption_short   string   may be empty
    facts           string   JSON object (``{}`` when none)

A shard of preference pairs (kind ``pairs``, :mod:`krea2_train.data.pairs`) holds one pair a row:
``sample_id`` is the pair's id, ``image`` its winner, the long caption its prompt, and two more
columns its loser, resized into the same bucket:

    loser_image         binary
    loser_image_crc32   uint32

The schema metadata key ``krea2.shard`` holds a JSON object: format version, resolution, bucket
name, width, height, image format, dataset and, in a shard of pairs, kind (``images`` when absent). Next to ``NAME.arrow`` the writer puts
``NAME.arrow.sha256`` (``sha256sum`` format) with the digest of the whole file; a reader checks
the file against it (or against a digest it is given, e.g. from the ``shards`` table) when it
opens the file, so a truncated or corrupt shard is refused with an error naming the file. A file
that cannot be opened or read (missing, permission denied, an I/O error) is refused as
*unavailable*, a storage problem, never as corrupt.
"""

from __future__ import annotations

import bisect
import io
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from PIL import Image

from krea2_train.data.buckets import Bucket
from krea2_train.errors import Krea2Error
from krea2_train.files import file_sha256, publish, temporary_path, write_text

FORMAT_VERSION = 1
METADATA_KEY = b"krea2.shard"
IMAGE_FORMATS = ("png", "webp", "jpeg")
CAPTION_KINDS = ("long", "medium", "short")
SHARD_KINDS = ("images", "pairs")

SHARD_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("image", pa.binary()),
        ("image_crc32", pa.uint32()),
        ("caption_long", pa.string()),
        ("caption_medium", pa.string()),
        ("caption_short", pa.string()),
        ("facts", pa.string()),
    ]
)
PAIR_SHARD_SCHEMA = pa.schema([*SHARD_SCHEMA, ("loser_image", pa.binary()), ("loser_image_crc32", pa.uint32())])
SCHEMAS = {"images": SHARD_SCHEMA, "pairs": PAIR_SHARD_SCHEMA}


class ShardError(Krea2Error):
    """A shard that cannot be read; ``path`` names the file, ``row`` the row when one is at fault.

    ``unavailable``: the file (or its checksum sidecar) could not be opened or read at all: missing,
    or a storage problem (an unmounted or failing file system, permission denied, an I/O error)
    rather than bad content, so it may read on another node or later; otherwise the content is
    corrupt and stays so.
    """

    def __init__(self, path: str | Path, message: str, row: int | None = None, *, unavailable: bool = False):
        self.path = str(path)
        self.message = message
        self.row = row
        self.unavailable = unavailable
        where = f"shard {self.path}" + (f" row {row}" if row is not None else "")
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class ShardHeader:
    """What the schema metadata says about a shard."""

    resolution: int
    bucket: str
    width: int
    height: int
    image_format: str
    dataset: str
    kind: str = "images"  # one of SHARD_KINDS


@dataclass(frozen=True)
class ShardSample:
    """One row: an image (a pair's winner) and, in a shard of pairs, its loser."""

    sample_id: int
    image_bytes: bytes
    captions: dict[str, str]
    facts: dict[str, Any] = field(default_factory=dict)
    loser_image_bytes: bytes | None = None


@dataclass(frozen=True)
class WrittenShard:
    path: Path
    num_samples: int
    sha256: str
    size_bytes: int
    header: ShardHeader
    sample_ids: tuple[int, ...]  # row by row


def sidecar_path(path: str | Path) -> Path:
    return Path(str(path) + ".sha256")


def encode_image(image: Image.Image, image_format: str, quality: int = 95) -> bytes:
    """Encode an RGB image: ``png``, ``webp`` (lossless) or ``jpeg`` (``quality`` 1-100)."""
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG", compress_level=1)
    elif image_format == "webp":
        image.save(buffer, format="WEBP", lossless=True, quality=quality, method=0)
    elif image_format == "jpeg":
        if not 1 <= quality <= 100:
            raise ValueError(f"jpeg quality must be in 1..100, got {quality}")
        image.save(buffer, format="JPEG", quality=quality, subsampling=0)
    else:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    return buffer.getvalue()


def decode_image(image_bytes: bytes) -> Image.Image:
    """Decode encoded bytes to an RGB image (raises PIL/OSError errors on corrupt data)."""
    with Image.open(io.BytesIO(image_bytes)) as image:
        image.load()
        return image.convert("RGB")


class ShardWriter:
    """Writes one shard; rows are stored in the order they are written (shuffle before).

    The file appears under its final name only when ``close()`` has written it completely,
    together with its ``.sha256`` sidecar.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        resolution: int,
        bucket: Bucket,
        image_format: str = "png",
        quality: int = 95,
        dataset: str = "",
        rows_per_batch: int = 64,
        kind: str = "images",
    ):
        if kind not in SHARD_KINDS:
            raise ValueError(f"kind must be one of {SHARD_KINDS}, got {kind!r}")
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
        if rows_per_batch <= 0:
            raise ValueError(f"rows_per_batch must be positive, got {rows_per_batch}")
        self.path = Path(path)
        self.header = ShardHeader(resolution, bucket.name, bucket.width, bucket.height, image_format, dataset, kind)
        self._quality = quality
        self._rows_per_batch = rows_per_batch
        self._pending: list[dict[str, Any]] = []
        self.sample_ids: list[int] = []  # written so far, row by row
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_path = temporary_path(self.path)
        header = {"version": FORMAT_VERSION, **self.header.__dict__}
        if kind == "images":  # absent means images: readers from before shards of pairs read these
            del header["kind"]
        metadata = {METADATA_KEY: json.dumps(header).encode()}
        self._schema = SCHEMAS[kind].with_metadata(metadata)
        self._sink = pa.OSFile(str(self._tmp_path), "wb")
        self._writer = pa.ipc.new_file(self._sink, self._schema)

    def write(
        self,
        sample_id: int,
        image: Image.Image,
        captions: dict[str, str],
        facts: dict[str, Any] | None = None,
        loser: Image.Image | None = None,
    ) -> None:
        """Append one sample; ``image`` (and a pair's ``loser``) must already have the bucket's size."""
        for what, picture in (("image", image), ("loser", loser)):
            if picture is not None and picture.size != (self.header.width, self.header.height):
                raise ValueError(
                    f"sample {sample_id}: {what} is {picture.size[0]}x{picture.size[1]}, bucket {self.header.bucket!r} "
                    f"needs {self.header.width}x{self.header.height} (resize_to_bucket first)"
                )
        if not captions.get("long"):
            raise ValueError(f"sample {sample_id}: a long caption is required")
        encoded = [None if p is None else encode_image(p.convert("RGB"), self.header.image_format, self._quality) for p in (image, loser)]
        self.write_encoded(sample_id, encoded[0], captions, facts, loser_bytes=encoded[1])

    def write_encoded(
        self,
        sample_id: int,
        image_bytes: bytes,
        captions: dict[str, str],
        facts: dict[str, Any] | None = None,
        loser_bytes: bytes | None = None,
    ) -> None:
        """Append one sample whose image (and a pair's loser) is already encoded in the shard's format."""
        pairs = self.header.kind == "pairs"
        if pairs != (loser_bytes is not None):
            raise ValueError(f"sample {sample_id}: a shard of {self.header.kind} " + ("needs a loser" if pairs else "holds no loser"))
        row = {
            "sample_id": int(sample_id),
            "image": image_bytes,
            "image_crc32": zlib.crc32(image_bytes),
            **{f"caption_{kind}": captions.get(kind) or "" for kind in CAPTION_KINDS},
            "facts": json.dumps(facts or {}, sort_keys=True),
        }
        if pairs:
            row |= {"loser_image": loser_bytes, "loser_image_crc32": zlib.crc32(loser_bytes)}
        self._pending.append(row)
        self.sample_ids.append(int(sample_id))
        if len(self._pending) >= self._rows_per_batch:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_batch(pa.RecordBatch.from_pylist(self._pending, schema=self._schema))
            self._pending = []

    def close(self) -> WrittenShard:
        """Finish the file and publish it durably (:mod:`krea2_train.files`): the sidecar first, then
        the shard, so a shard under its final name always has its sidecar, and both survive a crash
        once their rows are registered. On any error the temporary files are removed and the error
        propagates."""
        if not self.sample_ids:
            self.abort()
            raise ValueError(f"shard {self.path}: no samples written")
        try:
            self._flush()
            self._close_files()
            sha256 = file_sha256(self._tmp_path)
            write_text(sidecar_path(self.path), f"{sha256}  {self.path.name}\n")
            publish(self._tmp_path, self.path)
        except BaseException:
            self.abort()
            raise
        return WrittenShard(self.path, len(self.sample_ids), sha256, self.path.stat().st_size, self.header, tuple(self.sample_ids))

    def abort(self) -> None:
        """Discard the shard being written (safe to call more than once, and after close)."""
        self._close_files()
        self._tmp_path.unlink(missing_ok=True)

    def _close_files(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._writer.close()
            finally:
                self._sink.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


# Files this process has already checked: (path, size, mtime_ns, sha256). A shard is hashed once
# per process, not once per open.
_VERIFIED: set[tuple[str, int, int, str]] = set()


def _expected_sha256(path: Path) -> str:
    sidecar = sidecar_path(path)
    try:
        return sidecar.read_text().split()[0]
    except OSError as error:
        raise ShardError(path, f"no checksum given and its sidecar {sidecar} cannot be read: {error.strerror or error}", unavailable=True) from None
    except IndexError:
        raise ShardError(path, f"no checksum given and its sidecar {sidecar} is empty") from None


def verify_shard(path: str | Path, sha256: str | None = None) -> None:
    """Raise ``ShardError`` unless the file's SHA-256 equals ``sha256`` (default: the sidecar's)."""
    path = Path(path)
    expected = sha256 or _expected_sha256(path)
    try:
        stat = path.stat()
    except OSError as error:
        raise ShardError(path, f"cannot open: {error.strerror or error}", unavailable=True) from None
    key = (str(path), stat.st_size, stat.st_mtime_ns, expected)
    if key in _VERIFIED:
        return
    try:
        actual = file_sha256(path)
    except OSError as error:
        raise ShardError(path, f"cannot read: {error.strerror or error}", unavailable=True) from None
    if actual != expected:
        raise ShardError(path, f"checksum mismatch (sha256 {actual}, expected {expected}): truncated or corrupt")
    _VERIFIED.add(key)


class ShardReader:
    """Random access to one shard's rows through a memory map.

    ``verify`` (default) checks the whole file's SHA-256 on open against ``sha256`` or, when not
    given, the sidecar; every ``read`` checks the row's CRC-32. Failures raise ``ShardError``.
    """

    def __init__(self, path: str | Path, sha256: str | None = None, *, verify: bool = True):
        self.path = Path(path)
        if verify:
            verify_shard(self.path, sha256)
        try:
            self._file = pa.memory_map(str(self.path), "r")
        except OSError as error:
            raise ShardError(self.path, f"cannot open: {error.strerror or error}", unavailable=True) from None
        try:
            self._reader = pa.ipc.open_file(self._file)
        except (OSError, pa.ArrowException) as error:
            self._file.close()
            raise ShardError(self.path, f"not a readable Arrow IPC file: {error}") from None
        self.header = _parse_header(self.path, self._reader.schema)
        self._batch_starts: list[int] = []
        total = 0
        try:
            for index in range(self._reader.num_record_batches):
                self._batch_starts.append(total)
                total += self._reader.get_batch(index).num_rows
        except (OSError, pa.ArrowException) as error:
            raise ShardError(self.path, f"corrupt record batch: {error}") from None
        self.num_samples = total
        self._cached_batch: tuple[int, pa.RecordBatch] | None = None

    def read(self, row: int) -> ShardSample:
        if not 0 <= row < self.num_samples:
            raise IndexError(f"shard {self.path}: row {row} out of range 0..{self.num_samples - 1}")
        batch_index = bisect.bisect_right(self._batch_starts, row) - 1
        if self._cached_batch is None or self._cached_batch[0] != batch_index:
            try:
                self._cached_batch = (batch_index, self._reader.get_batch(batch_index))
            except (OSError, pa.ArrowException) as error:
                raise ShardError(self.path, f"corrupt record batch: {error}", row) from None
        values = self._cached_batch[1].slice(row - self._batch_starts[batch_index], 1).to_pylist()[0]
        image_bytes, loser_bytes = values["image"], values.get("loser_image")
        if zlib.crc32(image_bytes) != values["image_crc32"]:
            raise ShardError(self.path, "image bytes fail their CRC-32", row)
        if loser_bytes is not None and zlib.crc32(loser_bytes) != values["loser_image_crc32"]:
            raise ShardError(self.path, "loser image bytes fail their CRC-32", row)
        try:
            facts = json.loads(values["facts"])
        except (TypeError, ValueError) as error:
            raise ShardError(self.path, f"facts are not JSON: {error}", row) from None
        captions = {kind: values[f"caption_{kind}"] or "" for kind in CAPTION_KINDS}
        return ShardSample(values["sample_id"], image_bytes, captions, facts, loser_bytes)

    def close(self) -> None:
        self._cached_batch = None
        self._file.close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


def _parse_header(path: Path, schema: pa.Schema) -> ShardHeader:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ShardError(path, "not a krea2 shard (no krea2.shard metadata)")
    try:
        values = json.loads(raw)
        if values.pop("version") != FORMAT_VERSION:
            raise ValueError("unsupported format version")
        header = ShardHeader(**values)
        if header.kind not in SHARD_KINDS:
            raise ValueError(f"unknown kind {header.kind!r}")
    except (TypeError, ValueError, KeyError) as error:
        raise ShardError(path, f"bad shard metadata: {error}") from None
    if schema.remove_metadata() != SCHEMAS[header.kind]:
        raise ShardError(path, f"not a krea2 shard of {header.kind} (its schema differs)")
    return header

