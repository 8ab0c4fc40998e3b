"""The loader: exact resume (also on another world size), identical shapes on every rank,
corrupt and truncated shards replaced deterministically. No database here (see test_loader_db)."""

import errno
from pathlib import Path

import pytest
import torch
from PIL import Image

from krea2_train.data.buckets import Bucket
from krea2_train.data.loader import CorruptShardsError, LoaderConfig, ShardLoader
from krea2_train.data.plan import Manifest, ShardInfo
from krea2_train.data.shards import ShardWriter, encode_image
from test_shards import fail_reading

BUCKETS = (Bucket("1:1", 8, 8), Bucket("4:3", 12, 8), Bucket("3:4", 8, 12))


def sample_image(sample_id: int, bucket: Bucket) -> Image.Image:
    """A flat image whose colour encodes the sample id."""
    return Image.new("RGB", (bucket.width, bucket.height), (sample_id % 256, sample_id // 256, 7))


def write_toy_shards(out_dir: Path, counts=(13, 20, 9, 17, 11, 6, 15, 10, 12), corrupt_rows=()) -> Manifest:
    """Shards of flat images, buckets round-robin; ``corrupt_rows``: (shard number, row) pairs
    whose image bytes are garbage (valid CRC, undecodable)."""
    shards, next_id = [], 1
    for number, count in enumerate(counts):
        bucket = BUCKETS[number % len(BUCKETS)]
        path = out_dir / f"shard{number}.arrow"
        with ShardWriter(path, resolution=8, bucket=bucket, rows_per_batch=4) as writer:
            for row in range(count):
                captions = {"long": f"long {next_id}", "medium": f"medium {next_id}", "short": ""}
                if (number, row) in corrupt_rows:
                    writer.write_encoded(next_id, b"not an image", captions)
                else:
                    writer.write_encoded(next_id, encode_image(sample_image(next_id, bucket), "png"), captions)
                next_id += 1
            written = writer.close()
        shards.append(ShardInfo(number + 1, str(path), bucket.name, bucket.width, bucket.height, count, written.sha256))
    return Manifest(shards)


def config(**overrides) -> LoaderConfig:
    return LoaderConfig(**({"global_batch_size": 4, "seed": 11, "num_partitions": 2, "num_workers": 0} | overrides))


def global_steps(loaders, steps=None):
    """Run ``loaders`` (one per rank) in lockstep; per step: (epoch, index, bucket, ids, captions)."""
    out = []
    iterators = [iter(loader) for loader in loaders]
    while steps is None or len(out) < steps:
        try:
            batches = [next(it) for it in iterators]
        except StopIteration:
            break
        shapes = {tuple(b.images.shape) for b in batches}
        assert len(shapes) == 1, f"ranks got different shapes {shapes}"
        assert len({(b.epoch, b.index, b.bucket) for b in batches}) == 1
        out.append((batches[0].epoch, batches[0].index, batches[0].bucket,
                    sum((b.sample_ids.tolist() for b in batches), []), sum((b.captions for b in batches), [])))
    return out


def run_epochs(manifest, cfg, world_size, epochs=2):
    loaders = [ShardLoader(manifest, cfg, rank=r, world_size=world_size) for r in range(world_size)]
    return sum((global_steps(loaders) for _ in range(epochs)), [])


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Manifest:
    return write_toy_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def reference(manifest):
    return run_epochs(manifest, config(), world_size=1)


def test_batches_decode_to_the_right_pixels_and_captions(manifest):
    loader = ShardLoader(manifest, config(caption_mix={"long": 0.5, "medium": 0.3, "short": 0.2}), world_size=1)
    kinds = set()
    for batch in loader:
        bucket = next(b for b in BUCKETS if b.name == batch.bucket)
        assert batch.images.shape == (4, 3, bucket.height, bucket.width) and batch.images.dtype == torch.float32
        for image, sample_id, caption in zip(batch.images, batch.sample_ids.tolist(), batch.captions):
            expected = torch.tensor([sample_id % 256, sample_id // 256, 7]).float() / 127.5 - 1
            assert torch.allclose(image, expected[:, None, None].expand_as(image))
            kinds.add(caption.split()[0])
            assert caption in (f"long {sample_id}", f"medium {sample_id}")  # empty short -> long
    assert kinds == {"long", "medium"}
    assert loader.epoch == 1 and loader.batch_index == 0


def test_every_sample_once_per_epoch(manifest, reference):
    for epoch in (0, 1):
        ids = [i for step in reference if step[0] == epoch for i in step[3]]
        assert len(ids) == len(set(ids))
        assert len(ids) >= manifest.num_samples - 3 * 3  # fewer than B dropped per bucket
    assert [s[3] for s in reference if s[0] == 0] != [s[3] for s in reference if s[0] == 1]


@pytest.mark.parametrize("stop_after", [1, 7, 13])
def test_stop_mid_epoch_and_resume_exactly(manifest, reference, stop_after):
    loader = ShardLoader(manifest, config())
    before = global_steps([loader], steps=stop_after)
    state = loader.state_dict()
    resumed = ShardLoader(manifest, config())
    resumed.load_state_dict(state)
    after = global_steps([resumed]) + global_steps([resumed])
    assert before + after == reference


@pytest.mark.parametrize("world_before,world_after", [(2, 1), (1, 4), (4, 2)])
def test_resume_on_another_world_size_keeps_the_global_order(manifest, reference, world_before, world_after):
    before_loaders = [ShardLoader(manifest, config(), rank=r, world_size=world_before) for r in range(world_before)]
    before = global_steps(before_loaders, steps=5)
    states = [loader.state_dict() for loader in before_loaders]
    assert all(state == states[0] for state in states)
    after_loaders = [ShardLoader(manifest, config(), rank=r, world_size=world_after) for r in range(world_after)]
    for loader in after_loaders:
        loader.load_state_dict(states[0])
    after = global_steps(after_loaders) + global_steps(after_loaders)
    assert before + after == reference


def test_more_workers_than_cpus_are_capped_with_the_same_order(manifest, reference, monkeypatch, caplog):
    from krea2_train.data import loader as loader_module

    monkeypatch.setattr(loader_module.os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setattr(loader_module, "_capped_workers", set())
    with caplog.at_level("INFO"):
        assert loader_module.usable_workers(4) == 1 and loader_module.usable_workers(0) == 0
    assert "data.num_workers=4 is more than the 1 CPUs this process may use: 1 loader workers" in caplog.text
    epoch = global_steps([ShardLoader(manifest, config(num_workers=4, prefetch_factor=1))])
    assert epoch and epoch == reference[: len(epoch)]


def test_worker_processes_give_the_same_order_and_resume(manifest, reference):
    loader = ShardLoader(manifest, config(num_workers=2, prefetch_factor=1))
    first = global_steps([loader], steps=6)
    resumed = ShardLoader(manifest, config(num_workers=2))
    resumed.load_state_dict(loader.state_dict())
    assert first + global_steps([resumed]) + global_steps([resumed]) == reference


@pytest.mark.parametrize("workers", [0, 2])
def test_iterating_leaves_the_global_rng_alone(manifest, workers):
    """A resumed run restores the global RNG and then starts the loader: the loader must not draw
    from it, or CPU dropout after a resume differs from the uninterrupted run."""
    before = torch.get_rng_state()
    loader = ShardLoader(manifest, config(num_workers=workers, prefetch_factor=1))
    next(iter(loader))
    assert torch.equal(torch.get_rng_state(), before)


def test_state_from_another_manifest_or_seed_is_refused(manifest, tmp_path):
    state = ShardLoader(manifest, config()).state_dict()
    with pytest.raises(ValueError, match="seed"):
        ShardLoader(manifest, config(seed=12)).load_state_dict(state)
    other = write_toy_shards(tmp_path, counts=(13, 20, 9, 17, 11, 6, 15, 10, 13))
    with pytest.raises(ValueError, match="manifest_sha256"):
        ShardLoader(other, config()).load_state_dict(state)
    with pytest.raises(ValueError, match="divisible by the world size 3"):
        ShardLoader(manifest, config(), rank=0, world_size=3)


def test_state_of_an_older_epoch_plan_resumes_with_a_warning(manifest, caplog):
    state = {**ShardLoader(manifest, config()).state_dict(), "batch_index": 2}
    del state["plan_version"]  # saved before versions were recorded: version 1
    loader = ShardLoader(manifest, config())
    with caplog.at_level("WARNING"):
        loader.load_state_dict(state)
    assert loader.batch_index == 2 and "epoch plan version 1, this code uses version 2" in caplog.text


def _replaced(reference, damaged):
    """Positions whose sample differs; everything else must be identical."""
    assert [s[:3] for s in damaged] == [s[:3] for s in reference]
    return [(step, k) for step, (a, b) in enumerate(zip(reference, damaged)) for k, (x, y) in enumerate(zip(a[3], b[3])) if x != y]


def test_corrupt_image_is_replaced_deterministically_and_reported(tmp_path, reference):
    manifest = write_toy_shards(tmp_path, corrupt_rows={(1, 3)})  # sample id 14 + 3 = 17
    first = ShardLoader(manifest, config())
    steps, reports = [], {}
    for epoch in range(2):
        for batch in first:
            steps.append((batch.epoch, batch.index, batch.bucket, batch.sample_ids.tolist(), batch.captions))
            reports |= batch.bad_shards
    assert list(reports) == [2]
    assert "shard1.arrow row 3" in reports[2] and "does not decode" in reports[2]
    replaced = _replaced(reference, steps)
    assert len(replaced) == 2 and all(reference[s][3][k] == 17 for s, k in replaced)  # once per epoch
    assert all(steps[s][3][k] != 17 for s, k in replaced)
    assert run_epochs(manifest, config(), world_size=2) == steps  # same choice on another world size


def test_truncated_shard_is_replaced_and_the_run_continues(tmp_path, reference):
    manifest = write_toy_shards(tmp_path)
    path = Path(manifest.shards[4].path)
    path.write_bytes(path.read_bytes()[:200])
    loader = ShardLoader(manifest, config(num_workers=2))
    steps, reports = [], {}
    for epoch in range(2):
        for batch in loader:
            steps.append((batch.epoch, batch.index, batch.bucket, batch.sample_ids.tolist(), batch.captions))
            reports |= batch.bad_shards
    assert "shard4.arrow" in reports[5] and "truncated or corrupt" in reports[5]
    lost_ids = set(range(sum(s.num_samples for s in manifest.shards[:4]) + 1,
                         sum(s.num_samples for s in manifest.shards[:5]) + 1))
    replaced = _replaced(reference, steps)
    assert {reference[s][3][k] for s, k in replaced} <= lost_ids and len(replaced) > 0
    assert not lost_ids & {i for s in steps for i in s[3]}
    assert run_epochs(manifest, config(), world_size=4) == steps


def test_an_unreadable_shard_is_logged_once_and_counted(tmp_path, caplog):
    manifest = write_toy_shards(tmp_path)
    path = Path(manifest.shards[4].path)
    path.write_bytes(path.read_bytes()[:200])
    loader = ShardLoader(manifest, config(num_workers=2))
    first_found = []
    with caplog.at_level("WARNING", logger="krea2_train.data.loader"):
        for epoch in range(2):
            first_found += [batch.new_bad_shards for batch in loader if batch.new_bad_shards]
    assert list(loader.quarantined) == [5] and "truncated or corrupt" in loader.quarantined[5]
    assert first_found == [{5: loader.quarantined[5]}]  # reported in one batch, though read in many
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(path) in warnings[0] and "truncated or corrupt" in warnings[0]


def test_a_bucket_of_corrupt_shards_stops_the_loader_naming_them_after_quarantining_them(tmp_path):
    manifest = write_toy_shards(tmp_path)
    for shard in manifest.shards:
        Path(shard.path).write_bytes(Path(shard.path).read_bytes()[:200])
    loader = ShardLoader(manifest, config(num_workers=1))
    with pytest.raises(CorruptShardsError, match="all 3 shards of the bucket are corrupt") as raised:
        next(iter(loader))
    (bucket,) = {shard.bucket for shard in manifest.shards if shard.shard_id in loader.quarantined}
    in_bucket = [shard for shard in manifest.shards if shard.bucket == bucket]
    assert set(loader.quarantined) == {shard.shard_id for shard in in_bucket} and len(in_bucket) == 3
    assert f"bucket {bucket!r}" in str(raised.value) and all(shard.path in str(raised.value) for shard in in_bucket)
    assert not raised.value.retryable  # corrupt content stays corrupt: the launcher need not resubmit


def test_a_shard_that_does_not_open_is_replaced_but_not_quarantined(tmp_path, caplog):
    """A missing file (an unmounted file system, a failing disk) is a storage problem, not bad
    content: its samples are replaced, it is logged, and it is never quarantined (that would
    repack healthy data); a bucket of them stops the loader with a retryable error."""
    manifest = write_toy_shards(tmp_path)
    Path(manifest.shards[4].path).unlink()
    loader = ShardLoader(manifest, config(num_workers=1))
    with caplog.at_level("WARNING", logger="krea2_train.data.loader"):
        batches = list(loader)
    assert loader.quarantined == {} and all(not batch.new_bad_shards for batch in batches)
    assert list(loader.unavailable) == [5] and "cannot open" in loader.unavailable[5]
    assert [r.getMessage() for r in caplog.records if "not quarantined" in r.getMessage()] != []
    for shard in manifest.shards:
        Path(shard.path).unlink(missing_ok=True)
    loader = ShardLoader(manifest, config(num_workers=1))
    with pytest.raises(CorruptShardsError, match="did not open .*not quarantined") as raised:
        next(iter(loader))
    assert raised.value.retryable and loader.quarantined == {}


@pytest.mark.parametrize("verify_shards", [True, False])
def test_a_shard_on_failing_storage_is_replaced_but_not_quarantined(tmp_path, monkeypatch, verify_shards):
    """A shard that exists but cannot be read (permission denied, an I/O error) is unavailable,
    checksum verified or not: the loader goes on without it and never quarantines it."""
    manifest = write_toy_shards(tmp_path)
    reference = global_steps([ShardLoader(manifest, config(verify_shards=False))])  # verifies (and caches) nothing
    fail_reading(monkeypatch, manifest.shards[4].path, errno.EIO)
    loader = ShardLoader(manifest, config(verify_shards=verify_shards))
    batches = list(loader)
    assert loader.quarantined == {} and all(not batch.new_bad_shards for batch in batches)
    assert list(loader.unavailable) == [5] and f"{manifest.shards[4].path}: cannot" in loader.unavailable[5]
    assert "Input/output error" in loader.unavailable[5] and len(batches) == len(reference)


def test_buckets_too_small_for_a_batch_are_named_and_a_batch_no_bucket_holds_is_refused(caplog):
    from krea2_train.stages import StageConfigError
    from krea2_train.train.data import check_bucket_sizes

    manifest = Manifest([ShardInfo(1, "/s/1.arrow", "1:1", 8, 8, 6, "0" * 64), ShardInfo(2, "/s/2.arrow", "2:3", 8, 12, 4, "0" * 64),
                         ShardInfo(3, "/s/3.arrow", "3:2", 12, 8, 3, "0" * 64)])
    with caplog.at_level("WARNING", logger="krea2_train"):
        check_bucket_sizes(manifest, 4)
    assert "3 images in aspect buckets smaller than data.global_batch_size=4 never train (3:2: 3)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="krea2_train"):
        check_bucket_sizes(manifest, 3)
    assert caplog.text == ""
    with pytest.raises(StageConfigError, match=r"data.global_batch_size=256 is larger than every aspect bucket of the data "
                                                r"\(1:1: 6, 2:3: 4, 3:2: 3 images\): lower data.global_batch_size \(at most 6\)"):
        check_bucket_sizes(manifest, 256)
