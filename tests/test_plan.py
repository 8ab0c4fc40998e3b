"""The epoch plan: a pure function of (manifest, seed, epoch, B, partitions), sliced per rank."""

from collections import Counter

import numpy as np
import pytest

from krea2_train.data.plan import EpochPlan, Manifest, ShardInfo, choose_caption_kind, keyed_permutation

SHAPES = {"1:1": (8, 8), "4:3": (12, 8), "3:4": (8, 12)}


def _manifest(counts=(7, 30, 12, 25, 3, 40, 16, 9, 22, 31, 5, 18)) -> Manifest:
    names = list(SHAPES)
    shards = [
        ShardInfo(100 + i, f"/s/{i}.arrow", names[i % 3], *SHAPES[names[i % 3]], count, "0" * 64)
        for i, count in enumerate(counts)
    ]
    return Manifest(shards[::-1])  # given in any order, sorted by id


def _refs(batch):
    return list(zip(batch.shard_indices.tolist(), batch.rows.tolist()))


@pytest.mark.parametrize("batch_size,partitions", [(8, 1), (8, 2), (8, 4), (12, 3)])
def test_epoch_holds_each_sample_at_most_once_one_bucket_per_batch(batch_size, partitions):
    manifest = _manifest()
    plan = EpochPlan(manifest, seed=5, epoch=1, global_batch_size=batch_size, num_partitions=partitions)
    seen = []
    for index in range(plan.num_batches):
        batch = plan.batch(index)
        assert {manifest.shards[s].bucket for s in batch.shard_indices} == {batch.bucket}
        assert (batch.width, batch.height) == SHAPES[batch.bucket]
        assert batch.positions.tolist() == list(range(index * batch_size, (index + 1) * batch_size))
        seen += _refs(batch)
    assert len(seen) == len(set(seen))
    per_bucket = Counter(manifest.shards[s].bucket for s, _ in seen)
    for bucket in SHAPES:
        total = sum(s.num_samples for s in manifest.shards if s.bucket == bucket)
        assert per_bucket[bucket] == total // batch_size * batch_size  # only the tail (< B) is dropped


def test_plan_is_a_pure_function_and_changes_with_epoch_and_seed():
    manifest = _manifest()
    def order(seed, epoch):
        plan = EpochPlan(manifest, seed=seed, epoch=epoch, global_batch_size=8, num_partitions=2)
        return [ref for i in range(plan.num_batches) for ref in _refs(plan.batch(i))]
    assert order(3, 0) == order(3, 0)
    assert order(3, 0) != order(3, 1)
    assert order(3, 0) != order(4, 0)
    assert set(order(3, 0)) != set(order(3, 1))  # the dropped tails differ between epochs


def test_the_same_shards_under_other_ids_give_the_same_order():
    """Data packed again (another database, other shard ids, same order of ids) trains alike."""
    manifest = _manifest()
    renumbered = Manifest([ShardInfo(**{**shard.__dict__, "shard_id": shard.shard_id * 7 + 1000}) for shard in manifest.shards])
    plans = [EpochPlan(m, seed=4, epoch=1, global_batch_size=8, num_partitions=2) for m in (manifest, renumbered)]
    assert [_refs(plans[0].batch(i)) for i in range(plans[0].num_batches)] == [_refs(plans[1].batch(i)) for i in range(plans[1].num_batches)]


def test_rank_slices_are_contiguous_pieces_of_the_global_batch():
    plan = EpochPlan(_manifest(), seed=0, epoch=0, global_batch_size=8, num_partitions=2)
    for index in range(plan.num_batches):
        whole = _refs(plan.batch(index))
        for world in (1, 2, 4, 8):
            pieces = [plan.batch(index, rank, world) for rank in range(world)]
            assert sum((_refs(p) for p in pieces), []) == whole
            assert {p.bucket for p in pieces} == {plan.batch(index).bucket}


def test_each_shard_is_read_in_one_stretch_and_partitions_are_local():
    manifest = _manifest(counts=(64,) * 12)
    plan = EpochPlan(manifest, seed=1, epoch=0, global_batch_size=8, num_partitions=2)
    for rank in range(2):
        batches_by_shard: dict[int, list[int]] = {}
        for index in range(plan.num_batches):
            batch = plan.batch(index, rank, 2)
            for shard in set(batch.shard_indices.tolist()):
                batches_by_shard.setdefault(shard, []).append(int(np.flatnonzero(plan.batches_of_bucket[plan.batch_buckets[index]] == index)[0]))
        for bucket_batches in batches_by_shard.values():  # a shard is open for consecutive batches of its bucket
            assert bucket_batches == list(range(bucket_batches[0], bucket_batches[0] + len(bucket_batches)))
        if rank == 0:
            rank0_shards = set(batches_by_shard)
    # with world size == partitions, the two ranks read (almost) disjoint shard sets
    assert len(rank0_shards & set(batches_by_shard)) <= len(SHAPES)


def test_a_one_shard_bucket_composes_new_batches_every_epoch_and_drops_other_samples():
    """10 samples in one shard, batches of 4: each epoch 2 batches and 2 samples dropped; the rows
    are shuffled per epoch, so batches differ and, over a few epochs, every sample trains."""
    manifest = Manifest([ShardInfo(7, "/s/7.arrow", "1:1", 8, 8, 10, "0" * 64)])
    epochs = []
    for epoch in range(6):
        plan = EpochPlan(manifest, seed=3, epoch=epoch, global_batch_size=4)
        epochs.append([frozenset(plan.batch(index).rows.tolist()) for index in range(plan.num_batches)])
    assert all(len(batches) == 2 for batches in epochs)
    assert len({frozenset(batches) for batches in epochs}) == 6  # six different pairs of batches
    assert set().union(*(rows for batches in epochs for rows in batches)) == set(range(10))


@pytest.mark.parametrize("partitions", [1, 2, 4])
def test_shard_spans_match_a_brute_force_scan(partitions):
    plan = EpochPlan(_manifest(), seed=9, epoch=2, global_batch_size=8, num_partitions=partitions)
    for world in (1, 2, 4, 8):
        for rank in range(world):
            brute: dict[int, list[int]] = {}
            for index in range(plan.num_batches):
                for shard in set(plan.batch(index, rank, world).shard_indices.tolist()):
                    span = brute.setdefault(shard, [index, index])
                    span[1] = index
            spans = {s.shard_index: [s.first_batch, s.last_batch] for s in plan.shard_spans(rank, world)}
            assert spans == brute


def test_replacement_is_deterministic_and_stays_in_the_bucket():
    manifest = _manifest()
    plan = EpochPlan(manifest, seed=2, epoch=0, global_batch_size=8)
    again = EpochPlan(manifest, seed=2, epoch=0, global_batch_size=8)
    draws = [plan.replacement("4:3", 17, attempt) for attempt in range(20)]
    assert draws == [again.replacement("4:3", 17, attempt) for attempt in range(20)]
    assert len(set(draws)) > 10
    assert all(manifest.shards[s].bucket == "4:3" and 0 <= r < manifest.shards[s].num_samples for s, r in draws)


def test_caption_choice_is_deterministic_and_follows_the_mix():
    mix = {"long": 0.7, "medium": 0.2, "short": 0.1}
    kinds = [choose_caption_kind(0, 3, position, mix) for position in range(20000)]
    assert kinds == [choose_caption_kind(0, 3, position, mix) for position in range(20000)]
    counts = Counter(kinds)
    for kind, weight in mix.items():
        assert abs(counts[kind] / len(kinds) - weight) < 0.02
    assert set(choose_caption_kind(0, 0, p, {"long": 1.0}) for p in range(100)) == {"long"}
    with pytest.raises(ValueError, match="caption_mix"):
        choose_caption_kind(0, 0, 0, {"long": 0.0})


def test_keyed_permutation_is_a_permutation():
    perm = keyed_permutation(1000, (1, 2, 3))
    assert sorted(perm.tolist()) == list(range(1000))
    assert not np.array_equal(perm, np.arange(1000))


def test_bad_settings_are_clear_errors():
    manifest = _manifest()
    with pytest.raises(ValueError, match="divisible by num_partitions 3"):
        EpochPlan(manifest, seed=0, epoch=0, global_batch_size=8, num_partitions=3)
    plan = EpochPlan(manifest, seed=0, epoch=0, global_batch_size=8)
    with pytest.raises(ValueError, match="divisible by the world size 3"):
        plan.batch(0, 0, 3)
    with pytest.raises(ValueError, match="no bucket holds a full global batch"):
        EpochPlan(manifest, seed=0, epoch=0, global_batch_size=4096)
    with pytest.raises(ValueError, match="two shapes"):
        Manifest([ShardInfo(1, "a", "1:1", 8, 8, 4, ""), ShardInfo(2, "b", "1:1", 16, 16, 4, "")])


def test_manifest_round_trip_and_fingerprint(tmp_path):
    manifest = _manifest()
    manifest.save(tmp_path / "manifest.json")
    loaded = Manifest.load(tmp_path / "manifest.json")
    assert loaded.shards == manifest.shards and loaded.fingerprint == manifest.fingerprint
    assert _manifest(counts=(7, 30, 12, 25, 3, 40, 16, 9, 22, 31, 5, 19)).fingerprint != manifest.fingerprint
