"""Shard files: exact round trips, durable publishing, corrupt or truncated files refused naming
the file, and files that cannot be read refused as unavailable, not corrupt."""

import builtins
import errno
import os

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from krea2_train.data.buckets import Bucket
from krea2_train.data.shards import ShardError, ShardReader, ShardWriter, decode_image, sidecar_path

BUCKET = Bucket("4:3", 16, 12)


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8))


def _write(path, n=10, image_format="png", rows_per_batch=4):
    with ShardWriter(path, resolution=14, bucket=BUCKET, image_format=image_format, dataset="toy", rows_per_batch=rows_per_batch) as writer:
        for i in range(n):
            captions = {"long": f"long {i}", "medium": f"medium {i}" if i % 2 else None, "short": f"short {i}"}
            writer.write(100 + i, _image(i), captions, {"index": i, "shapes": ["circle"] * i})
        return writer.close()


@pytest.mark.parametrize("image_format", ["png", "webp"])
def test_lossless_round_trip(tmp_path, image_format):
    written = _write(tmp_path / "a.arrow", image_format=image_format)
    assert written.num_samples == 10 and sidecar_path(written.path).read_text().startswith(written.sha256)
    with ShardReader(written.path) as reader:
        assert reader.num_samples == 10
        assert (reader.header.bucket, reader.header.width, reader.header.height) == ("4:3", 16, 12)
        assert reader.header.image_format == image_format and reader.header.resolution == 14
        for i in [9, 0, 5, 4, 3]:  # random access across record batches
            sample = reader.read(i)
            assert sample.sample_id == 100 + i
            assert np.array_equal(np.asarray(decode_image(sample.image_bytes)), np.asarray(_image(i)))
            assert sample.captions == {"long": f"long {i}", "medium": f"medium {i}" if i % 2 else "", "short": f"short {i}"}
            assert sample.facts == {"index": i, "shapes": ["circle"] * i}
        with pytest.raises(IndexError, match="out of range"):
            reader.read(10)


def test_jpeg_is_close(tmp_path):
    written = _write(tmp_path / "j.arrow", n=2, image_format="jpeg")
    with ShardReader(written.path, written.sha256) as reader:
        decoded = np.asarray(decode_image(reader.read(1).image_bytes)).astype(float)
    assert np.abs(decoded - np.asarray(_image(1))).mean() < 20


def fail_reading(monkeypatch, path, code: int) -> None:
    """Make ``path`` fail as on failing storage: opening or mapping it raises ``OSError(code)``
    (root ignores permissions, so chmod 000 cannot do this)."""
    real_open, real_memory_map = builtins.open, pa.memory_map

    def failing(real):
        def call(file, *args, **kwargs):
            if str(file) == str(path):
                raise OSError(code, os.strerror(code), str(path))
            return real(file, *args, **kwargs)

        return call

    monkeypatch.setattr(builtins, "open", failing(real_open))
    monkeypatch.setattr(pa, "memory_map", failing(real_memory_map))


def test_truncated_shard_is_refused_naming_the_file(tmp_path):
    written = _write(tmp_path / "t.arrow")
    data = written.path.read_bytes()
    written.path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match=r"t\.arrow.*truncated or corrupt") as verified:
        ShardReader(written.path)
    with pytest.raises(ShardError, match=r"t\.arrow.*not a readable Arrow IPC file") as mapped:
        ShardReader(written.path, verify=False)
    assert not verified.value.unavailable and not mapped.value.unavailable  # corrupt: quarantined


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("code", [errno.EACCES, errno.EIO])
def test_a_shard_that_cannot_be_read_is_unavailable_not_corrupt(tmp_path, monkeypatch, verify, code):
    """Permission denied or an I/O error says nothing about the content: the error names the file
    and the cause and is marked unavailable (replaced, never quarantined)."""
    written = _write(tmp_path / "u.arrow")
    fail_reading(monkeypatch, written.path, code)
    with pytest.raises(ShardError, match=rf"u\.arrow: cannot (read|open): {os.strerror(code)}") as raised:
        ShardReader(written.path, verify=verify)
    assert raised.value.unavailable and raised.value.path == str(written.path)


def test_flipped_byte_fails_the_checksum_and_the_row_crc(tmp_path):
    written = _write(tmp_path / "c.arrow")
    with ShardReader(written.path) as reader:
        image_bytes = reader.read(3).image_bytes
    data = bytearray(written.path.read_bytes())
    offset = bytes(data).index(image_bytes) + len(image_bytes) // 2
    data[offset] ^= 0xFF
    written.path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"c\.arrow: checksum mismatch"):
        ShardReader(written.path)
    with ShardReader(written.path, verify=False) as reader:
        reader.read(2)
        with pytest.raises(ShardError, match=r"c\.arrow row 3: image bytes fail their CRC-32") as info:
            reader.read(3)
    assert info.value.row == 3 and info.value.path == str(written.path)


def test_a_failure_while_closing_raises_itself_and_leaves_no_shard(tmp_path):
    (tmp_path / "c.arrow.sha256").mkdir()  # the sidecar cannot be written
    with pytest.raises(IsADirectoryError):
        _write(tmp_path / "c.arrow", n=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.arrow.sha256"]
    written = _write(tmp_path / "d.arrow", n=3)
    assert written.sample_ids == (100, 101, 102)


def test_close_publishes_the_sidecar_then_the_shard_durably(tmp_path, monkeypatch):
    """Each file's bytes reach the disk before its rename and the directory entry after it, so a
    shard registered after close() still holds its rows after a power loss."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    def replace(source, target):
        events.append(("rename", str(source), str(target)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    directory = tmp_path.resolve()
    written = _write(directory / "a.arrow", n=3)
    shard, sidecar = str(written.path), str(sidecar_path(written.path))
    pid = os.getpid()
    assert events == [
        ("fsync", f"{sidecar}.tmp-{pid}"),
        ("rename", f"{sidecar}.tmp-{pid}", sidecar),
        ("fsync", str(directory)),
        ("fsync", f"{shard}.tmp-{pid}"),
        ("rename", f"{shard}.tmp-{pid}", shard),
        ("fsync", str(directory)),
    ]
    assert sorted(p.name for p in directory.iterdir()) == ["a.arrow", "a.arrow.sha256"]


def test_missing_sidecar_and_bad_inputs_are_clear_errors(tmp_path):
    written = _write(tmp_path / "m.arrow", n=1)
    sidecar_path(written.path).unlink()
    with pytest.raises(ShardError, match="sidecar"):
        ShardReader(written.path)
    ShardReader(written.path, written.sha256).close()
    with pytest.raises(ValueError, match="needs 16x12"):
        with ShardWriter(tmp_path / "x.arrow", resolution=14, bucket=BUCKET) as writer:
            writer.write(1, Image.new("RGB", (12, 12)), {"long": "a"})
    assert not list(tmp_path.glob("x.arrow*"))
    with pytest.raises(ValueError, match="image_format"):
        ShardWriter(tmp_path / "y.arrow", resolution=14, bucket=BUCKET, image_format="gif")
    with pytest.raises(ValueError, match="no samples"):
        ShardWriter(tmp_path / "z.arrow", resolution=14, bucket=BUCKET).close()
    with pytest.raises(ShardError, match="not a krea2 shard"):
        import pyarrow as pa

        other = tmp_path / "other.arrow"
        with pa.ipc.new_file(str(other), pa.schema([("a", pa.int64())])) as w:
            w.write_batch(pa.record_batch([pa.array([1])], names=["a"]))
        ShardReader(other, verify=False)
