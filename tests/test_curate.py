"""Curation: hashes, quality scores, and the decode / filters / dedup jobs on a real store."""

from __future__ import annotations

import io
import random
import re

import numpy as np
import pytest
from PIL import Image

from helpers import krea2_error
from krea2_train.curate import jobs as curate_jobs
from krea2_train.curate.filters import laplacian_variance, quality_scores, rgb_entropy, white_black_ratios
from krea2_train.curate.hashing import (
    COLORHASH_BITS,
    PHASH_BITS,
    color_hash,
    dct_matrix,
    hamming,
    perceptual_hash,
    phash_bands,
)
from krea2_train.data.ingest import ingest
from krea2_train.data.shapes import write_shapes_dataset
from krea2_train.store.queue import Failed, JobContext, Queue, job_counts, run_handler, run_worker


def _scene(seed: int, size: int = 96) -> Image.Image:
    """A smooth random scene: a few blurred coloured blobs."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)


def _jpeg_roundtrip(image: Image.Image, size: int) -> Image.Image:
    buffer = io.BytesIO()
    image.resize((size, size), Image.Resampling.LANCZOS).save(buffer, format="JPEG", quality=80)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def test_dct_matrix_is_orthonormal():
    matrix = dct_matrix(48)
    np.testing.assert_allclose(matrix @ matrix.T, np.eye(48), atol=1e-12)


def test_perceptual_hash_survives_resize_and_jpeg_but_separates_scenes():
    original = _scene(0)
    copy = _jpeg_roundtrip(original, 64)
    assert len(perceptual_hash(original)) == PHASH_BITS
    assert hamming(perceptual_hash(original), perceptual_hash(copy)) <= curate_jobs.PHASH_MAX_DISTANCE
    assert hamming(color_hash(original), color_hash(copy)) <= curate_jobs.COLOR_MAX_DISTANCE
    for seed in range(1, 6):
        assert hamming(perceptual_hash(original), perceptual_hash(_scene(seed))) > 3 * curate_jobs.PHASH_MAX_DISTANCE


def test_colour_hash_separates_same_layout_in_other_colours():
    layout = np.asarray(_scene(0).convert("L"), np.float64)[..., None]
    # luminance proportional to the same layout in both, so the perceptual hash cannot tell them apart
    original = Image.fromarray((layout * [1.0, 0.3, 0.3]).astype(np.uint8))  # reddish
    recoloured = Image.fromarray((layout * [0.3, 0.3, 1.0]).astype(np.uint8))  # bluish
    assert hamming(perceptual_hash(original), perceptual_hash(recoloured)) <= curate_jobs.PHASH_MAX_DISTANCE
    assert len(color_hash(original)) == COLORHASH_BITS
    assert hamming(color_hash(original), color_hash(recoloured)) > curate_jobs.COLOR_MAX_DISTANCE


def test_colour_hash_distance_is_the_summed_level_difference():
    dark, light = Image.new("RGB", (8, 8), (0, 0, 0)), Image.new("RGB", (8, 8), (64, 0, 0))
    assert hamming(color_hash(dark), color_hash(light)) == 4 * 2  # 4 cells, red level 0 -> 2


def test_phash_bands_find_every_pair_within_the_distance():
    rng = random.Random(0)
    for _ in range(200):
        bits = [rng.choice("01") for _ in range(PHASH_BITS)]
        other = list(bits)
        for index in rng.sample(range(PHASH_BITS), curate_jobs.PHASH_MAX_DISTANCE):
            other[index] = "1" if other[index] == "0" else "0"
        a, b = "".join(bits), "".join(other)
        assert set(phash_bands(a)) & set(phash_bands(b))
    assert sorted(band >> 12 for band in phash_bands("0" * PHASH_BITS)) == list(range(12))
    with pytest.raises(ValueError, match="144 bits"):
        phash_bands("01")


def test_quality_scores_on_known_images():
    white = np.full((32, 32, 3), 255, np.uint8)
    assert laplacian_variance(white) == 0.0
    assert rgb_entropy(white) == 0.0
    assert white_black_ratios(white) == (1.0, 0.0)
    half = np.zeros((32, 32, 3), np.uint8)
    half[:, :16] = 255
    assert white_black_ratios(half) == (0.5, 0.5)
    assert rgb_entropy(half) == pytest.approx(1.0)
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    assert rgb_entropy(noise) > 7.9
    assert laplacian_variance(noise) > 100 * laplacian_variance(np.asarray(_scene(0)))
    scores = quality_scores(Image.new("RGB", (2048, 1024), (0, 0, 0)))
    assert scores == {"laplacian_var": 0.0, "rgb_entropy": 0.0, "white_ratio": 0.0, "black_ratio": 1.0}


def test_the_pixel_limit_is_the_documented_one():
    """2^28 pixels: Pillow's smaller default (an error above about 179 M) no longer applies first."""
    from krea2_train.curate.images import MAX_IMAGE_PIXELS, decode_bytes

    def png(side):
        buffer = io.BytesIO()
        Image.new("1", (side, side)).save(buffer, format="PNG")
        return buffer.getvalue()

    with Image.open(io.BytesIO(png(15_000))) as image:  # 225 M pixels: within the limit
        assert image.size == (15_000, 15_000)
    with pytest.raises(ValueError, match=f"exceeds {MAX_IMAGE_PIXELS} pixels"):
        decode_bytes(png(17_000))  # 289 M: ours refuses before decoding
    with pytest.raises(ValueError, match=f"the limit is {MAX_IMAGE_PIXELS} pixels"):
        decode_bytes(png(23_200))  # 538 M: Pillow's bomb check, with our limit named


def test_decode_turns_photos_upright_scales_16_bit_grey_and_puts_transparency_on_white():
    from krea2_train.curate.images import decode_bytes

    # a JPEG stored 200 wide x 100 high with EXIF orientation 6 (rotate 90 degrees to view): 100x200 upright
    stored = Image.new("RGB", (200, 100), (200, 30, 30))
    stored.paste((30, 30, 200), (0, 0, 20, 100))  # a blue band on the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", exif=exif, quality=95)
    upright = decode_bytes(buffer.getvalue())
    assert upright.size == (100, 200)
    assert np.asarray(upright)[5, 50, 2] > 150  # the stored left edge is now the top
    # 16-bit grey at mid level: Pillow's own conversion makes it all white
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(buffer, "PNG")
    grey = np.asarray(decode_bytes(buffer.getvalue()))
    assert grey.shape == (16, 16, 3) and (np.abs(grey.astype(int) - 128) <= 1).all()
    # transparent pixels: white, not black
    buffer = io.BytesIO()
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(buffer, "PNG")
    assert (np.asarray(decode_bytes(buffer.getvalue())) == 255).all()


def test_a_score_with_two_bad_ends_needs_an_order():
    from krea2_train.curate.balance import curate_dataset
    from krea2_train.store import StoreError

    with pytest.raises(StoreError, match="laplacian_var has no better direction"):
        curate_dataset(None, "images", "sharpest", 10, "laplacian_var")


def test_decode_fails_a_file_it_cannot_read_by_name_for_a_retry():
    with pytest.raises(FileNotFoundError, match="/nonexistent/x.png"):
        curate_jobs.decode_row({"uri": "/nonexistent/x.png"})
    (outcome,) = curate_jobs.DECODE.handler([{"id": 1, "uri": "/nonexistent/x.png"}], None)
    assert isinstance(outcome, Failed) and "/nonexistent/x.png" in outcome.error
    with pytest.raises(ValueError, match="unsupported URI scheme 's3'"):
        curate_jobs.open_rgb("s3://bucket/x.png")


@pytest.mark.postgres
def test_images_unreadable_during_an_outage_decode_once_storage_is_back(fresh_store, tmp_path):
    """A mount gone during decode fails the rows (retried after a backoff); it does not record them
    undecodable, so they decode when the storage returns."""
    folder = write_shapes_dataset(tmp_path / "shapes", 4, 32, seed=1)
    ingest(fresh_store, "shapes", folder=folder)
    hidden = folder.rename(tmp_path / "unmounted")
    queue = Queue(fresh_store, curate_jobs.DECODE)
    try:
        queue.seed()
        claims = queue.claim()
        outcomes = run_handler(curate_jobs.DECODE, claims, JobContext(fresh_store, queue.owner))
        assert queue.finish(claims, outcomes) == (0, 4)
    finally:
        queue.close()
    hidden.rename(folder)
    with fresh_store.pool.connection() as conn:
        assert conn.execute("SELECT count(*) FROM images WHERE decode_ok IS NOT NULL").fetchone()[0] == 0
        conn.execute("UPDATE job_runs SET not_before = now()")  # the backoff, waited out
    assert run_worker(fresh_store, curate_jobs.DECODE).completed == 4
    with fresh_store.pool.connection() as conn:
        assert conn.execute("SELECT count(*) FROM images WHERE decode_ok").fetchone()[0] == 4


@pytest.fixture
def curated_folder(tmp_path):
    """Shapes images + an exact copy + a re-encoded near copy + a corrupt and a tiny file."""
    folder = write_shapes_dataset(tmp_path / "shapes", 12, 64, seed=3)
    (folder / "z_exact.png").write_bytes((folder / "000002.png").read_bytes())
    _jpeg_roundtrip(Image.open(folder / "000005.png").convert("RGB"), 80).save(folder / "z_near.jpg", quality=90)
    (folder / "z_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(folder / "z_tiny.png")
    return folder


@pytest.mark.postgres
def test_decode_filters_dedup_pipeline(fresh_store, curated_folder):
    ingest(fresh_store, "shapes", folder=curated_folder)
    assert run_worker(fresh_store, curate_jobs.DEDUP).claimed == 0  # nothing decoded yet: dedup waits
    decode = run_worker(fresh_store, curate_jobs.DECODE)
    assert (decode.completed, decode.failed) == (16, 0)  # the corrupt file is a result, not a retry
    run_worker(fresh_store, curate_jobs.FILTERS)
    run_worker(fresh_store, curate_jobs.DEDUP)
    assert job_counts(fresh_store) == {
        "decode": {"pending": 0, "running": 0, "done": 16, "dead": 0},
        "dedup": {"pending": 0, "running": 0, "done": 14, "dead": 0},
        "filters": {"pending": 0, "running": 0, "done": 14, "dead": 0},
    }
    with fresh_store.pool.connection() as conn:
        rows = conn.execute(
            "SELECT i.uri, i.decode_ok, i.decode_error, i.width, i.md5, o.uri, i.rgb_entropy"
            " FROM images i LEFT JOIN images o ON o.id = i.duplicate_of"
        ).fetchall()
    by_name = {uri.rsplit("/", 1)[1]: row for uri, *row in rows}
    corrupt = by_name["z_corrupt.png"]
    assert corrupt[0] is False and str(curated_folder / "z_corrupt.png") in corrupt[1]
    tiny = by_name["z_tiny.png"]
    assert tiny[0] is False and "8x8" in tiny[1] and tiny[2] == 8
    duplicates = {name: row[4].rsplit("/", 1)[1] for name, row in by_name.items() if row[4] is not None}
    assert duplicates == {"z_exact.png": "000002.png", "z_near.jpg": "000005.png"}
    assert by_name["z_exact.png"][3] == by_name["000002.png"][3]
    assert all(row[5] is not None for row in by_name.values() if row[0])


@pytest.mark.postgres
def test_a_decode_row_that_died_does_not_hold_back_dedup_of_its_dataset(fresh_store, curated_folder):
    ingest(fresh_store, "shapes", folder=curated_folder)
    with fresh_store.pool.connection() as conn:  # as after its workers crashed on it max_attempts times
        conn.execute("INSERT INTO job_runs (job, image_id, state, attempt) SELECT 'decode', id, 'dead', 3"
                     " FROM images WHERE uri LIKE '%%/000003.png'")
    assert run_worker(fresh_store, curate_jobs.DECODE).completed == 15
    assert run_worker(fresh_store, curate_jobs.DEDUP).completed == 13  # 14 decodable, less the dead one


@pytest.mark.postgres
def test_dedup_waits_for_its_own_dataset_only(fresh_store, curated_folder):
    """Dedup starts on a dataset once all its images are decoded, whatever another dataset still
    has undecoded, and waits on a dataset while any of its images is undecoded."""
    ingest(fresh_store, "decoded", folder=curated_folder)
    ingest(fresh_store, "undecoded", folder=curated_folder)
    assert run_worker(fresh_store, curate_jobs.DECODE, datasets=["decoded"]).completed == 16
    with fresh_store.pool.connection() as conn:  # one image of the other decoded, the rest waiting
        conn.execute(
            "UPDATE images SET decode_ok = true WHERE id = (SELECT min(id) FROM images"
            " WHERE dataset_id = (SELECT id FROM datasets WHERE name = 'undecoded'))"
        )
    run_worker(fresh_store, curate_jobs.DEDUP)
    with fresh_store.pool.connection() as conn:
        judged = conn.execute(
            "SELECT d.name, count(*) FROM job_runs j JOIN datasets d ON d.id = j.dataset_id"
            " WHERE j.job = 'dedup' GROUP BY d.name"
        ).fetchall()
    assert judged == [("decoded", 14)]


@pytest.mark.postgres
def test_cli_work_runs_the_decode_job(fresh_store, curated_folder, capsys):
    from krea2_train.cli import main

    ingest(fresh_store, "shapes", folder=curated_folder)
    ingest(fresh_store, "later", folder=curated_folder)
    assert "unknown dataset 'nope'" in krea2_error(["data", "work", "--dsn", fresh_store.dsn, "--job", "decode", "--dataset", "nope"], capsys)
    assert main(["data", "work", "--dsn", fresh_store.dsn, "--job", "decode", "--batch", "5", "--dataset", "shapes"]) == 0
    assert "'completed': 16" in capsys.readouterr().out
    assert job_counts(fresh_store)["decode"]["done"] == 16  # the later dataset's images wait for a worker of theirs
    assert main(["data", "work", "--dsn", fresh_store.dsn, "--job", "decode"]) == 0
    assert job_counts(fresh_store)["decode"]["done"] == 32


@pytest.mark.postgres
def test_cli_pack_target_then_the_pack_job_packs_the_dataset(fresh_store, curated_folder, tmp_path, capsys):
    from krea2_train.cli import main
    from krea2_train.data.pack import dataset_counts

    store_args = ["--dsn", fresh_store.dsn]
    ingest(fresh_store, "shapes", folder=curated_folder)
    for job in ("decode", "dedup"):
        assert main(["data", "work", *store_args, "--job", job]) == 0
    capsys.readouterr()
    assert main(["data", "work", *store_args, "--job", "pack"]) == 0  # nothing to pack yet: says why
    printed = capsys.readouterr()
    assert "'completed': 0" in printed.out and "no pack target yet: `krea2 data pack-target" in printed.err
    assert "aspect ratio '1x1' is not of the form 'W:H'" in krea2_error(  # refused before a target holds it
        ["data", "pack-target", *store_args, "--dataset", "shapes", "--resolution", "32", "--out", str(tmp_path / "bad"),
         "--buckets", "1x1"], capsys)
    for resolution, multiple, message in (("0", "16", "--resolution must be a positive multiple of --pixel-multiple \\(16\\), got 0"),
                                          ("100", "16", "got 100")):
        error = krea2_error(["data", "pack-target", *store_args, "--dataset", "shapes", "--resolution", resolution, "--out",
                             str(tmp_path / "bad"), "--pixel-multiple", multiple], capsys)
        assert re.search(message, error), error
    with fresh_store.pool.connection() as conn:
        assert conn.execute("SELECT count(*) FROM pack_targets").fetchone()[0] == 0
    assert main(["data", "pack-target", *store_args, "--dataset", "shapes", "--resolution", "32", "--out", str(tmp_path / "shards"),
                 "--buckets", "1:1", "--pixel-multiple", "4"]) == 0
    assert "pack target: shapes at 32 px" in capsys.readouterr().out
    assert main(["data", "work", *store_args, "--job", "pack"]) == 0
    with fresh_store.pool.connection() as conn:
        packed = conn.execute("SELECT count(*) FROM shard_samples s JOIN shards h ON h.id = s.shard_id WHERE h.resolution = 32").fetchone()[0]
    (counts,) = dataset_counts(fresh_store, "shapes")
    assert counts.packable > 0 and packed == counts.packable and list((tmp_path / "shards").rglob("*.arrow"))
    capsys.readouterr()
    assert main(["data", "status", *store_args]) == 0  # the target and how much of it is packed
    assert ["shapes", "32", "images", str(packed), str(tmp_path / "shards")] in [line.split() for line in capsys.readouterr().out.splitlines()]


def _always_fails(rows, ctx):
    raise RuntimeError("the model directory is missing")


@pytest.mark.postgres
def test_cli_work_exits_non_zero_when_every_row_failed(fresh_store, curated_folder, capsys, monkeypatch):
    """A handler that fails on everything (a broken install or setting) ends `data work` with
    ALL_FAILED_EXIT and points at the errors, instead of exiting 0 with nothing done."""
    from krea2_train.cli import main
    from krea2_train.data.commands import ALL_FAILED_EXIT
    from krea2_train.store import queue

    monkeypatch.setitem(queue._REGISTRY, "broken", queue.Job(name="broken", select_predicate_sql="true", handler=_always_fails,
                                                             batch_size=8, max_attempts=2, retry_backoff_s=0.0))
    ingest(fresh_store, "shapes", folder=curated_folder)
    assert main(["data", "work", "--dsn", fresh_store.dsn, "--job", "broken"]) == ALL_FAILED_EXIT
    printed = capsys.readouterr()
    assert "'failed': 32" in printed.out and "every row the workers claimed failed (32 attempts); `krea2 data status --errors`" in printed.err
    assert job_counts(fresh_store)["broken"]["dead"] == 16
    assert main(["data", "work", "--dsn", fresh_store.dsn, "--job", "broken"]) == 0  # nothing left to claim: nothing failed


def test_work_exits_3_only_when_no_worker_completed_a_row(capsys):
    """Over several workers: one whose claimed batch failed, while another retried and completed
    it, is a job that got done (exit 0); rows failing everywhere and none completed is exit 3."""
    from krea2_train.data.commands import ALL_FAILED_EXIT, work_exit_code

    assert work_exit_code([{"completed": 0, "failed": 3}, {"completed": 16, "failed": 0}]) == 0
    assert work_exit_code([{"completed": 0, "failed": 3}, {"completed": 0, "failed": 0}]) == ALL_FAILED_EXIT
    assert work_exit_code([{"completed": 0, "failed": 0}]) == 0  # nothing to do

