"""The epoch plan: which samples form each global batch, as a pure function of the inputs.

Inputs: a pinned ``Manifest`` (the shards a run trains on), ``seed``, ``epoch``,
``global_batch_size`` B and ``num_partitions`` P (the canonical partition count, fixed for the
life of a run). Nothing else: not the world size, not the number of loader workers, not which
process answered first, not the database. Hence exact resume, exact replay of a loss spike, and
the same global order after resuming on another world size.

How an epoch is laid out, per bucket b (buckets are never mixed inside a batch):

1. The bucket's shards (sorted by shard id) are permuted with a key of (seed, epoch, bucket), and
   their rows concatenated, each shard's rows permuted with a key of (seed, epoch, the shard's
   index in the manifest; not its id, so the same data packed twice gives the same order): the
   bucket stream, N_b samples long. Rows of one shard are adjacent in the stream, so a reader
   holds few shards open at a time (random access inside a memory-mapped shard is cheap), and
   batches are composed afresh every epoch, even in a bucket of one shard.
2. The stream is cut into P contiguous partitions of N_b // P or N_b // P + 1 samples.
3. The bucket contributes n_b = N_b // B full batches. Bucket batch j takes, from every partition
   p, the B / P samples at partition offsets [j * B / P, (j + 1) * B / P), partition 0 first.
   With P equal to the number of nodes, each node reads only its own partition's shards.
4. The N_b - n_b * B samples left at the partitions' tails are dropped for this epoch (fewer
   than B per bucket). The shard and row orders change every epoch, so different samples are
   dropped each time. A bucket of fewer than B samples gives no batch at all.

The epoch is the sequence of all buckets' batches, interleaved by a permutation keyed by
(seed, epoch) that keeps every bucket's batches in order j = 0, 1, ... Rank r of world size w
receives samples [r * B / w, (r + 1) * B / w) of every global batch.

Randomness comes from a counter-based hash (SplitMix64 finaliser) of integer keys, never from a
stateful generator, so the plan does not change with the numpy version.
"""

from __future__ import annotations

import collections
import hashlib
import json
import zlib
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np

from krea2_train.files import write_text

PLAN_VERSION = 2  # bumped when the same inputs give another order (2: rows shuffled within shards)
_MASK64 = (1 << 64) - 1
# Stream tags keep the hash streams of different decisions independent.
TAG_SHARD_ORDER = 1
TAG_BATCH_ORDER = 2
TAG_REPLACEMENT = 3
TAG_CAPTION = 4
TAG_ROW_ORDER = 5
ROW_ORDERS_KEPT = 16  # row orders a bucket stream keeps (a batch reads one shard per partition, or two)


def hash_u64(key: Sequence[int], index: np.ndarray | int) -> np.ndarray:
    """Pseudo-random uint64 for each ``index`` under ``key``: a pure function of both."""
    state = np.uint64(0x243F6A8885A308D3)
    with np.errstate(over="ignore"):
        for part in key:
            state = _splitmix64(state ^ np.uint64(int(part) & _MASK64))
        return _splitmix64(state ^ np.asarray(index, dtype=np.int64).astype(np.uint64))


def _splitmix64(value):
    value = value + np.uint64(0x9E3779B97F4A7C15)
    value = (value ^ (value >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    value = (value ^ (value >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return value ^ (value >> np.uint64(31))


def keyed_permutation(length: int, key: Sequence[int]) -> np.ndarray:
    """A permutation of ``range(length)`` that depends only on ``key``: int64 [length]."""
    return np.argsort(hash_u64(key, np.arange(length)), kind="stable")


def unit_interval(key: Sequence[int], index: int) -> float:
    """A uniform number in [0, 1) determined by ``key`` and ``index``."""
    return float(int(hash_u64(key, index)) >> 11) / float(1 << 53)


def bucket_key(name: str) -> int:
    return zlib.crc32(name.encode())


@dataclass(frozen=True)
class ShardInfo:
    """One registered shard, as the plan and the loader need it."""

    shard_id: int
    path: str
    bucket: str
    width: int
    height: int
    num_samples: int
    sha256: str
    kind: str = "images"  # "pairs": one preference pair a row (krea2_train.data.pairs)

    def to_json(self) -> dict:
        """Its fields; ``kind`` only when not ``images``, so the fingerprints of manifests pinned
        before shards of pairs existed stay the same."""
        values = asdict(self)
        if self.kind == "images":
            del values["kind"]
        return values


class Manifest:
    """The shards one run trains on, sorted by shard id, all of one kind; pin it in the run directory."""

    def __init__(self, shards: Sequence[ShardInfo]):
        self.shards: tuple[ShardInfo, ...] = tuple(sorted(shards, key=lambda shard: shard.shard_id))
        if not self.shards:
            raise ValueError("manifest is empty: no ready shards to train on")
        ids = [shard.shard_id for shard in self.shards]
        if len(set(ids)) != len(ids):
            raise ValueError("manifest lists a shard id twice")
        kinds = sorted({shard.kind for shard in self.shards})
        if len(kinds) > 1:
            raise ValueError(f"manifest mixes shards of {' and '.join(kinds)}: a run reads single images or preference pairs")
        self.kind: str = kinds[0]
        shapes: dict[str, tuple[int, int]] = {}
        for shard in self.shards:
            if shard.num_samples <= 0:
                raise ValueError(f"shard {shard.shard_id} ({shard.path}) has {shard.num_samples} samples")
            shape = shapes.setdefault(shard.bucket, (shard.width, shard.height))
            if shape != (shard.width, shard.height):
                raise ValueError(
                    f"bucket {shard.bucket!r} has shards of two shapes {shape} and "
                    f"{(shard.width, shard.height)}: a manifest holds one resolution"
                )
        self.bucket_shapes: dict[str, tuple[int, int]] = dict(sorted(shapes.items()))

    @property
    def buckets(self) -> tuple[str, ...]:
        return tuple(self.bucket_shapes)

    @property
    def num_samples(self) -> int:
        return sum(shard.num_samples for shard in self.shards)

    @property
    def bucket_sizes(self) -> dict[str, int]:
        """Samples per bucket, in bucket order."""
        return {name: sum(s.num_samples for s in self.shards if s.bucket == name) for name in self.buckets}

    @cached_property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps([shard.to_json() for shard in self.shards], sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        return cls([ShardInfo(**values) for values in json.loads(text)])

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        return cls.from_json(Path(path).read_text())


@dataclass(frozen=True)
class RankBatch:
    """A rank's slice of one global batch. Arrays are int64 [slice size].

    ``positions`` are the samples' positions in the epoch (global batch index * B + offset);
    ``shard_indices`` index ``Manifest.shards``; ``rows`` are rows inside those shards.
    """

    epoch: int
    index: int
    bucket: str
    width: int
    height: int
    positions: np.ndarray
    shard_indices: np.ndarray
    rows: np.ndarray


@dataclass(frozen=True)
class ShardSpan:
    """A rank reads shard ``shard_index`` in global batches ``first_batch`` .. ``last_batch``."""

    shard_index: int
    first_batch: int
    last_batch: int


class _BucketStream:
    """One bucket's stream for one epoch: shards in shuffled order, each one's rows shuffled."""

    def __init__(self, shard_indices: np.ndarray, counts: np.ndarray, num_partitions: int, row_key: tuple[int, ...]):
        self.shard_indices = shard_indices  # manifest indices in stream order (also the row order's key)
        self.counts = counts
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.length = int(self.starts[-1])
        self.partition_starts = (np.arange(num_partitions, dtype=np.int64) * self.length) // num_partitions
        self.row_key = row_key  # (seed, epoch, TAG_ROW_ORDER)
        # the row orders of the last shards read: consecutive batches read the same shards
        self._row_orders: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

    def row_order(self, shard: int) -> np.ndarray:
        """Stream shard ``shard``'s rows in this epoch's order (a permutation of its row numbers)."""
        if shard in self._row_orders:
            self._row_orders.move_to_end(shard)
        else:
            key = (*self.row_key, int(self.shard_indices[shard]))
            self._row_orders[shard] = keyed_permutation(int(self.counts[shard]), key)
            if len(self._row_orders) > ROW_ORDERS_KEPT:
                self._row_orders.popitem(last=False)
        return self._row_orders[shard]

    def locate(self, stream_positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(manifest shard index, row) of each stream position."""
        local = np.searchsorted(self.starts, stream_positions, side="right") - 1
        offsets = stream_positions - self.starts[local]
        rows = np.empty_like(offsets)
        for shard in np.unique(local):  # a batch spans one or a few shards
            here = local == shard
            rows[here] = self.row_order(int(shard))[offsets[here]]
        return self.shard_indices[local], rows


class EpochPlan:
    """The global batches of one epoch; see the module docstring for the layout."""

    def __init__(self, manifest: Manifest, *, seed: int, epoch: int, global_batch_size: int, num_partitions: int = 1):
        if global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        if num_partitions <= 0 or global_batch_size % num_partitions:
            raise ValueError(
                f"global_batch_size {global_batch_size} must be divisible by num_partitions {num_partitions}"
            )
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.manifest = manifest
        self.seed = seed
        self.epoch = epoch
        self.global_batch_size = global_batch_size
        self.num_partitions = num_partitions
        self.block = global_batch_size // num_partitions
        self._streams = [self._bucket_stream(name) for name in manifest.buckets]
        batches_per_bucket = np.array([stream.length // global_batch_size for stream in self._streams], dtype=np.int64)
        self.num_batches = int(batches_per_bucket.sum())
        if self.num_batches == 0:
            raise ValueError(
                f"no bucket holds a full global batch of {global_batch_size} samples "
                f"(bucket sizes: {dict(zip(manifest.buckets, (s.length for s in self._streams)))})"
            )
        labels = np.repeat(np.arange(len(self._streams), dtype=np.int64), batches_per_bucket)
        self.batch_buckets = labels[keyed_permutation(self.num_batches, (seed, epoch, TAG_BATCH_ORDER))]
        self.batch_within_bucket = np.empty(self.num_batches, dtype=np.int64)
        self.batches_of_bucket: list[np.ndarray] = []
        for bucket_index in range(len(self._streams)):
            global_indices = np.flatnonzero(self.batch_buckets == bucket_index)
            self.batch_within_bucket[global_indices] = np.arange(len(global_indices))
            self.batches_of_bucket.append(global_indices)

    def _bucket_stream(self, name: str) -> _BucketStream:
        indices = np.array([i for i, shard in enumerate(self.manifest.shards) if shard.bucket == name], dtype=np.int64)
        order = indices[keyed_permutation(len(indices), (self.seed, self.epoch, TAG_SHARD_ORDER, bucket_key(name)))]
        counts = np.array([self.manifest.shards[i].num_samples for i in order], dtype=np.int64)
        return _BucketStream(order, counts, self.num_partitions, (self.seed, self.epoch, TAG_ROW_ORDER))

    def slice_bounds(self, rank: int, world_size: int) -> tuple[int, int]:
        """Offsets [start, stop) of rank ``rank``'s slice inside every global batch."""
        if world_size <= 0 or self.global_batch_size % world_size:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} must be divisible by the world size {world_size}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        size = self.global_batch_size // world_size
        return rank * size, (rank + 1) * size

    def batch(self, index: int, rank: int = 0, world_size: int = 1) -> RankBatch:
        """Rank ``rank``'s slice of global batch ``index`` (the whole batch for world size 1)."""
        if not 0 <= index < self.num_batches:
            raise IndexError(f"global batch {index} outside epoch {self.epoch} (0..{self.num_batches - 1})")
        start, stop = self.slice_bounds(rank, world_size)
        bucket_index = int(self.batch_buckets[index])
        stream = self._streams[bucket_index]
        offsets = np.arange(start, stop, dtype=np.int64)
        partitions, within_block = np.divmod(offsets, self.block)
        stream_positions = stream.partition_starts[partitions] + self.batch_within_bucket[index] * self.block + within_block
        shard_indices, rows = stream.locate(stream_positions)
        name = self.manifest.buckets[bucket_index]
        width, height = self.manifest.bucket_shapes[name]
        positions = index * self.global_batch_size + offsets
        return RankBatch(self.epoch, index, name, width, height, positions, shard_indices, rows)

    def replacement(self, bucket: str, position: int, attempt: int) -> tuple[int, int]:
        """Candidate ``attempt`` (0, 1, ...) to stand in for the unreadable sample at ``position``:
        (manifest shard index, row), drawn uniformly from the same bucket's stream."""
        stream = self._streams[self.manifest.buckets.index(bucket)]
        draw = int(hash_u64((self.seed, self.epoch, TAG_REPLACEMENT, position), attempt)) % stream.length
        shard_indices, rows = stream.locate(np.array([draw], dtype=np.int64))
        return int(shard_indices[0]), int(rows[0])

    def shard_spans(self, rank: int, world_size: int) -> list[ShardSpan]:
        """Every shard rank ``rank`` reads this epoch, with the first and last global batch that
        reads it (ignoring replacements), sorted by first batch."""
        start, stop = self.slice_bounds(rank, world_size)
        spans: dict[int, list[int]] = {}
        for bucket_index, stream in enumerate(self._streams):
            bucket_batches = self.batches_of_bucket[bucket_index]
            if len(bucket_batches) == 0:
                continue
            for partition in range(start // self.block, (stop - 1) // self.block + 1):
                first_offset = max(start, partition * self.block) - partition * self.block
                end_offset = min(stop, (partition + 1) * self.block) - partition * self.block
                base = stream.partition_starts[partition]
                shard_lo, shard_hi = stream.starts[:-1], stream.starts[1:]
                # bucket batch j reads stream positions [base + j*block + first_offset, base + j*block + end_offset)
                first_j = np.maximum(0, (shard_lo - base - end_offset) // self.block + 1)
                last_j = np.minimum(len(bucket_batches) - 1, (shard_hi - base - first_offset - 1) // self.block)
                for local in np.flatnonzero(first_j <= last_j):
                    first_batch = int(bucket_batches[first_j[local]])
                    last_batch = int(bucket_batches[last_j[local]])
                    span = spans.setdefault(int(stream.shard_indices[local]), [first_batch, last_batch])
                    span[0], span[1] = min(span[0], first_batch), max(span[1], last_batch)
        return sorted((ShardSpan(index, first, last) for index, (first, last) in spans.items()),
                      key=lambda span: (span.first_batch, span.shard_index))


def choose_caption_kind(seed: int, epoch: int, position: int, caption_mix: dict[str, float]) -> str:
    """Which caption ('long', 'medium' or 'short') the sample at ``position`` uses this epoch.

    ``caption_mix`` maps kinds to non-negative weights (normalised here).
    """
    total = sum(caption_mix.values())
    if total <= 0 or any(weight < 0 for weight in caption_mix.values()):
        raise ValueError(f"caption_mix needs non-negative weights with a positive sum, got {caption_mix}")
    draw = unit_interval((seed, epoch, TAG_CAPTION), position) * total
    cumulative = 0.0
    for kind, weight in caption_mix.items():
        cumulative += weight
        if draw < cumulative:
            return kind
    return next(kind for kind, weight in reversed(caption_mix.items()) if weight > 0)
