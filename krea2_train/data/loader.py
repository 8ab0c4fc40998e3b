"""The training loader: each rank streams its slices of the epoch plan through worker processes.

Worker w of n (torch ``DataLoader`` workers) builds the rank's slice of global batches
``start + w, start + w + n, ...``; the ``DataLoader`` returns workers' outputs round-robin, so the
rank sees global batches in plan order whatever the number of workers. The loader's state is
just (epoch, next global batch index): independent of world size and worker count, exact to the
batch, and small enough for every checkpoint.

Unreadable samples. A sample whose shard fails its checksum or cannot be opened, or whose row
fails its CRC, decoding or size check, is replaced by the first readable candidate of
``EpochPlan.replacement(bucket, position, attempt)``, attempt = 0, 1, ... : a uniform draw from
the same bucket keyed by (seed, epoch, position, attempt). The batch keeps its shape on every
rank, and since a corrupt file stays corrupt, a replayed or resumed run makes the same choice.
The loader logs a warning naming each unreadable shard and why (once per shard), counts it
(``ShardLoader.quarantined``; ``Batch.new_bad_shards`` holds the ones first found in a batch, for
the trainer's ``quarantine`` events) and reports it to the ``LeaseKeeper``, which marks it
quarantined in the ``shards`` table; the run itself keeps using the pinned manifest, so its order
never depends on when or whether the database heard about it. A shard file (or its checksum
sidecar) that does not open at all is a storage problem more often than bad content (a missing
mount, a failing disk): its samples are replaced the same way, but it is logged as unavailable
(``ShardLoader.unavailable``) and not quarantined. A batch slot that no replacement draw can fill
(every shard of its bucket unreadable) stops the loader with ``CorruptShardsError``, after the
corrupt shards found are quarantined; it is retryable (``user_error.txt`` is not written, so the
Slurm launcher checks the nodes and resubmits) when some of them did not open.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from krea2_train.data.plan import PLAN_VERSION, EpochPlan, Manifest, RankBatch, ShardInfo, choose_caption_kind
from krea2_train.data.shards import ShardError, ShardReader, decode_image
from krea2_train.errors import Krea2Error
from krea2_train.store.leases import LeaseKeeper, RunInfo, Span

logger = logging.getLogger(__name__)

QUARANTINE_FLUSH_TIMEOUT_S = 10.0  # how long a failing loader waits for its quarantine writes
LISTED_SHARDS = 3  # how many unreadable shards an error message names


class LoaderStateMismatch(Krea2Error, ValueError):
    """A checkpoint's loader state from other data settings: resuming would change the sample order."""


# the setting behind each field of the loader's state, as a user sets it
STATE_SETTINGS = {"seed": "seed", "global_batch_size": "data.global_batch_size", "num_partitions": "the partition count"}


class CorruptShardsError(Krea2Error, RuntimeError):
    """A batch slot that no replacement draw could fill: the bucket's shards are unreadable.

    Retryable when some of them did not open at all (a storage problem may be gone on another
    node); lasting when every one is corrupt."""

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class LoaderConfig:
    """How a run reads its shards; every field but the worker settings shapes the sample order.

    caption_mix: weights of 'long', 'medium' and 'short' captions; the kind is drawn per
        (seed, epoch, position); a sample without that rewrite falls back to its long caption.
    num_partitions: the canonical partition count; keep it fixed for the life of a run (set it
        to the node count of the largest run for locality); must divide global_batch_size.
    """

    global_batch_size: int
    seed: int = 0
    num_partitions: int = 1
    caption_mix: dict[str, float] = field(default_factory=lambda: {"long": 1.0})
    num_workers: int = 2
    prefetch_factor: int = 2
    max_replacement_attempts: int = 64
    verify_shards: bool = True
    open_shards_per_worker: int = 8

    def __post_init__(self):
        unknown = set(self.caption_mix) - {"long", "medium", "short"}
        if unknown:
            raise ValueError(f"caption_mix has unknown caption kinds {sorted(unknown)}")
        if self.num_workers < 0 or self.prefetch_factor < 1 or self.max_replacement_attempts < 1:
            raise ValueError("num_workers must be >= 0, prefetch_factor and max_replacement_attempts >= 1")


@dataclass
class Batch:
    """One rank's batch of one training step.

    images: float32 [b, 3, H, W] in [-1, 1], b = global_batch_size / world_size, one bucket.
    captions: b strings; facts: b dicts, the structured facts behind each image (``{}`` when the
    dataset has none; the shapes world's are :func:`krea2_train.data.shapes.facts`);
    sample_ids: int64 [b] (``images.id``, or ``preference_pairs.id`` in a run on pairs);
    positions: int64 [b], the samples' places in the epoch (global batch index * B + offset).
    loser_images: a run on preference pairs only: float32 [b, 3, H, W], the loser of each
    winner in ``images`` (the caption is the pair's prompt).
    """

    images: torch.Tensor
    captions: list[str]
    facts: list[dict]
    sample_ids: torch.Tensor
    positions: torch.Tensor
    bucket: str
    epoch: int
    index: int
    bad_shards: dict[int, str] = field(default_factory=dict)  # shard id -> error, corrupt shards found in this batch
    new_bad_shards: dict[int, str] = field(default_factory=dict)  # those of bad_shards the loader had not seen
    unavailable_shards: dict[int, str] = field(default_factory=dict)  # shard id -> error, files that did not open
    loser_images: torch.Tensor | None = None


@dataclass(frozen=True)
class UnreadableBatch:
    """What a worker returns instead of a batch when a slot had no readable candidate."""

    epoch: int
    index: int
    bucket: str
    attempts: int
    bad_shards: dict[int, str]
    unavailable_shards: dict[int, str]


def pil_to_tensor(image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [-1, 1]."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return pixels.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class _ShardCache:
    """A worker's open readers (LRU) and the shards it found unreadable."""

    def __init__(self, manifest: Manifest, capacity: int, verify: bool):
        self.manifest = manifest
        self.capacity = capacity
        self.verify = verify
        self.readers: collections.OrderedDict[int, ShardReader] = collections.OrderedDict()
        self.bad: dict[int, ShardError] = {}

    def reader(self, shard_index: int) -> ShardReader:
        if shard_index in self.bad:
            raise self.bad[shard_index]
        if shard_index in self.readers:
            self.readers.move_to_end(shard_index)
            return self.readers[shard_index]
        shard = self.manifest.shards[shard_index]
        try:
            reader = ShardReader(shard.path, shard.sha256, verify=self.verify)
            _check_header(reader, shard)
        except ShardError as error:
            self.bad[shard_index] = error
            raise
        self.readers[shard_index] = reader
        if len(self.readers) > self.capacity:
            self.readers.popitem(last=False)[1].close()
        return reader


def _check_header(reader: ShardReader, shard: ShardInfo) -> None:
    header = reader.header
    found = (header.kind, header.bucket, header.width, header.height, reader.num_samples)
    if found != (shard.kind, shard.bucket, shard.width, shard.height, shard.num_samples):
        reader.close()
        raise ShardError(
            shard.path,
            f"holds {reader.num_samples} {header.kind} of {header.bucket} {header.width}x{header.height}, the manifest "
            f"says {shard.num_samples} {shard.kind} of {shard.bucket} {shard.width}x{shard.height}",
        )


def _decode_to_tensor(image_bytes: bytes, path, row: int, width: int, height: int, what: str = "image") -> torch.Tensor:
    """Encoded bytes -> float32 [3, H, W] in [-1, 1]; raises ShardError naming the file and row."""
    try:
        image = decode_image(image_bytes)
    except Exception as error:  # PIL raises several types for corrupt data
        raise ShardError(path, f"{what} does not decode: {type(error).__name__}: {error}", row) from None
    if image.size != (width, height):
        raise ShardError(path, f"{what} is {image.size[0]}x{image.size[1]}, bucket needs {width}x{height}", row)
    return pil_to_tensor(image)


def _read_sample(cache: _ShardCache, shard_index: int, row: int, width: int, height: int):
    """(sample, image tensor [3, H, W], loser tensor [3, H, W] or None in a shard of single images);
    raises ShardError naming the file (and row)."""
    reader = cache.reader(shard_index)
    sample = reader.read(row)
    image = _decode_to_tensor(sample.image_bytes, reader.path, row, width, height)
    if sample.loser_image_bytes is None:
        return sample, image, None
    return sample, image, _decode_to_tensor(sample.loser_image_bytes, reader.path, row, width, height, "loser image")


def load_rank_batch(
    plan: EpochPlan, batch: RankBatch, cache: _ShardCache, config: LoaderConfig
) -> dict[str, Any] | UnreadableBatch:
    """Read and decode one rank batch, replacing unreadable samples (see module docstring); an
    ``UnreadableBatch`` when a slot has no readable candidate (the loader quarantines, then raises)."""
    images = torch.empty(len(batch.rows), 3, batch.height, batch.width)
    losers = torch.empty_like(images) if plan.manifest.kind == "pairs" else None
    captions, facts, sample_ids, bad_shards, unavailable_shards = [], [], [], {}, {}
    for slot, (position, shard_index, row) in enumerate(zip(batch.positions.tolist(), batch.shard_indices.tolist(), batch.rows.tolist())):
        candidates = itertools.chain(
            [(shard_index, row)],
            (plan.replacement(batch.bucket, position, attempt) for attempt in range(config.max_replacement_attempts)),
        )
        for candidate_shard, candidate_row in candidates:
            try:
                sample, images[slot], loser = _read_sample(cache, candidate_shard, candidate_row, batch.width, batch.height)
                if losers is not None:
                    losers[slot] = loser
                break
            except ShardError as error:
                found = unavailable_shards if error.unavailable else bad_shards
                found.setdefault(plan.manifest.shards[candidate_shard].shard_id, str(error))
        else:
            return UnreadableBatch(
                batch.epoch, batch.index, batch.bucket, config.max_replacement_attempts, bad_shards, unavailable_shards
            )
        kind = choose_caption_kind(config.seed, batch.epoch, position, config.caption_mix)
        captions.append(sample.captions.get(kind) or sample.captions["long"])
        facts.append(sample.facts)
        sample_ids.append(sample.sample_id)
    return {
        "images": images,
        "loser_images": losers,
        "captions": captions,
        "facts": facts,  # the structured facts behind the image ({} when the dataset has none)
        "sample_ids": torch.tensor(sample_ids, dtype=torch.int64),
        "positions": torch.from_numpy(batch.positions.copy()),
        "bucket": batch.bucket,
        "epoch": batch.epoch,
        "index": batch.index,
        "bad_shards": bad_shards,
        "unavailable_shards": unavailable_shards,
    }


class _RankSliceDataset(IterableDataset):
    """Rank ``rank``'s slices of global batches ``start_batch ..`` of one epoch, split over workers."""

    def __init__(self, manifest: Manifest, config: LoaderConfig, epoch: int, start_batch: int, rank: int, world_size: int):
        self.manifest = manifest
        self.config = config
        self.epoch = epoch
        self.start_batch = start_batch
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        plan = make_plan(self.manifest, self.config, self.epoch)
        cache = _ShardCache(self.manifest, self.config.open_shards_per_worker, self.config.verify_shards)
        for index in range(self.start_batch + worker_id, plan.num_batches, num_workers):
            yield load_rank_batch(plan, plan.batch(index, self.rank, self.world_size), cache, self.config)


def make_plan(manifest: Manifest, config: LoaderConfig, epoch: int) -> EpochPlan:
    return EpochPlan(
        manifest, seed=config.seed, epoch=epoch, global_batch_size=config.global_batch_size,
        num_partitions=config.num_partitions,
    )


def _ignore_termination(worker_id: int) -> None:
    """A loader worker ignores SIGTERM and SIGINT. Slurm sends SIGTERM to every process of a job
    step (a preemption, a cancel, the time limit), and Ctrl-C sends SIGINT to every process of the
    terminal's group; a worker killed by either makes the trainer's next batch raise before the
    step whose all-reduce agrees to checkpoint and exit. The workers still end with the loader, or
    when the trainer dies (torch's parent watchdog)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ShardLoader:
    """Iterate a rank's batches; ``state_dict``/``load_state_dict`` for the trainer's checkpoint.

    ``for batch in loader`` yields the rest of the current epoch, then moves to the next epoch
    (iterate again for it). ``state_dict()`` taken after consuming a batch resumes right after it,
    on any world size that divides the global batch.
    """

    def __init__(
        self,
        manifest: Manifest,
        config: LoaderConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        lease_keeper: LeaseKeeper | None = None,
    ):
        self.manifest = manifest
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.lease_keeper = lease_keeper
        self.epoch = 0
        self.batch_index = 0
        self.quarantined: dict[int, str] = {}  # shard id -> error, every corrupt shard found so far
        self.unavailable: dict[int, str] = {}  # shard id -> error, every shard that did not open
        plan = make_plan(manifest, config, 0)
        plan.slice_bounds(rank, world_size)  # validates divisibility with a clear error
        self.batches_per_epoch = plan.num_batches

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "seed": self.config.seed,
            "global_batch_size": self.config.global_batch_size,
            "num_partitions": self.config.num_partitions,
            "manifest_sha256": self.manifest.fingerprint,
            "plan_version": PLAN_VERSION,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = self.state_dict()
        for key, setting in STATE_SETTINGS.items():
            if state[key] != expected[key]:
                raise LoaderStateMismatch(
                    f"the checkpoint's loader state was saved with {setting}={state[key]!r} and this start has"
                    f" {expected[key]!r}: the sample order would change; resume with {setting}={state[key]!r},"
                    " or start a new run_name"
                )
        if state["manifest_sha256"] != expected["manifest_sha256"]:
            raise LoaderStateMismatch(
                f"the checkpoint's loader state was saved with another manifest (manifest_sha256 {state['manifest_sha256'][:12]},"
                f" this start's {expected['manifest_sha256'][:12]}): the sample order would change; resume with the run's"
                " pinned manifest.json"
            )
        saved_version = state.get("plan_version", 1)
        if saved_version != PLAN_VERSION and state["batch_index"] > 0:
            logger.warning(
                "the checkpoint's loader state comes from epoch plan version %d, this code uses version %d: the rest "
                "of epoch %d follows the new order, so some of its samples repeat and others are skipped (later epochs "
                "are exact)", saved_version, PLAN_VERSION, state["epoch"],
            )
        if not 0 <= state["batch_index"] <= self.batches_per_epoch:
            raise ValueError(f"loader state batch_index {state['batch_index']} outside 0..{self.batches_per_epoch}")
        self.epoch, self.batch_index = int(state["epoch"]), int(state["batch_index"])

    def __len__(self) -> int:
        return self.batches_per_epoch - self.batch_index

    def __iter__(self) -> Iterator[Batch]:
        if self.batch_index >= self.batches_per_epoch:
            self.epoch, self.batch_index = self.epoch + 1, 0
        epoch = self.epoch
        dataset = _RankSliceDataset(self.manifest, self.config, epoch, self.batch_index, self.rank, self.world_size)
        if self.lease_keeper is not None:
            self.lease_keeper.begin_epoch(epoch, self.batch_index, self._spans(epoch))
        workers = usable_workers(self.config.num_workers)
        loader = DataLoader(
            dataset, batch_size=None, num_workers=workers,
            prefetch_factor=self.config.prefetch_factor if workers else None,
            pin_memory=torch.cuda.is_available(),  # page-locked batches: the trainer's copy to the GPU is asynchronous
            # its own generator: starting an iterator draws a base seed, which must not advance the
            # global RNG that a checkpoint restores (CPU dropout would not resume exactly); the
            # batches are keyed by (seed, epoch, position) and never use it
            generator=torch.Generator(),
            worker_init_fn=_ignore_termination,
        )
        for item in loader:
            if isinstance(item, UnreadableBatch):
                self._quarantine(item.bad_shards)
                self._note_unavailable(item.unavailable_shards)
                if self.lease_keeper is not None:
                    self.lease_keeper.flush(QUARANTINE_FLUSH_TIMEOUT_S)
                raise CorruptShardsError(self._unreadable_message(item), retryable=bool(item.unavailable_shards))
            batch = Batch(**item)
            batch.new_bad_shards = self._quarantine(batch.bad_shards)
            self._note_unavailable(batch.unavailable_shards)
            self.batch_index = batch.index + 1
            if self.lease_keeper is not None:
                self.lease_keeper.advance(self.batch_index)
            yield batch
        if self.batch_index >= self.batches_per_epoch:
            self.epoch, self.batch_index = epoch + 1, 0

    def _quarantine(self, bad_shards: dict[int, str]) -> dict[int, str]:
        """Log, count and report (to the lease keeper) the shards of ``bad_shards`` not seen
        before; returns them."""
        new = {shard_id: error for shard_id, error in bad_shards.items() if shard_id not in self.quarantined}
        for shard_id, error in new.items():
            self.quarantined[shard_id] = error
            logger.warning(
                "unreadable shard (id %d) quarantined, %d of the manifest's %d so far; its samples are replaced "
                "by others of its bucket: %s", shard_id, len(self.quarantined), len(self.manifest.shards), error,
            )
            if self.lease_keeper is not None:
                self.lease_keeper.quarantine(shard_id, error)
        return new

    def _note_unavailable(self, unavailable_shards: dict[int, str]) -> None:
        """Log the shards of ``unavailable_shards`` not seen before. They are not quarantined: a
        file that did not open (missing, an unmounted or failing file system) may read on
        another node or after a repair."""
        for shard_id, error in unavailable_shards.items():
            if shard_id not in self.unavailable:
                self.unavailable[shard_id] = error
                logger.warning(
                    "shard (id %d) did not open, %d so far: not quarantined (check the storage); its samples "
                    "are replaced by others of its bucket: %s", shard_id, len(self.unavailable), error,
                )

    def _unreadable_message(self, item: UnreadableBatch) -> str:
        in_bucket = [shard.shard_id for shard in self.manifest.shards if shard.bucket == item.bucket]
        corrupt = [shard_id for shard_id in in_bucket if shard_id in self.quarantined]
        unavailable = [shard_id for shard_id in in_bucket if shard_id in self.unavailable]
        message = f"epoch {item.epoch} batch {item.index}: no readable sample of bucket {item.bucket!r} in {item.attempts} replacement draws"
        for found, what, errors in ((corrupt, "are corrupt (quarantined)", self.quarantined),
                                    (unavailable, "did not open (missing files or a storage problem; not quarantined)", self.unavailable)):  # fmt: skip
            if found:
                how_many = f"all {len(in_bucket)}" if len(found) == len(in_bucket) else f"{len(found)} of the {len(in_bucket)}"
                listed = "; ".join(errors[shard_id] for shard_id in found[:LISTED_SHARDS])
                message += f": {how_many} shards of the bucket {what}: {listed}" + ("; ..." if len(found) > LISTED_SHARDS else "")
        return message

    def _spans(self, epoch: int) -> list[Span]:
        plan = make_plan(self.manifest, self.config, epoch)
        shards = self.manifest.shards
        return [
            Span(shards[span.shard_index].shard_id, span.first_batch, span.last_batch)
            for span in plan.shard_spans(self.rank, self.world_size)
        ]

    def run_info(self, run_id: str) -> RunInfo:
        """What ``loader_runs`` should record for this loader's run."""
        return RunInfo(
            run_id=run_id, manifest_sha256=self.manifest.fingerprint, num_shards=len(self.manifest.shards),
            num_samples=self.manifest.num_samples, batches_per_epoch=self.batches_per_epoch,
            global_batch_size=self.config.global_batch_size, world_size=self.world_size,
        )


MANIFEST_SQL = """
SELECT s.id, s.path, s.bucket, s.width, s.height, s.num_samples, s.sha256, s.kind
  FROM shards s JOIN datasets d ON d.id = s.dataset_id
 WHERE d.name = ANY(%(datasets)s) AND s.resolution = %(resolution)s AND s.state = 'ready' AND s.kind = %(kind)s
   AND (%(buckets)s::text[] IS NULL OR s.bucket = ANY(%(buckets)s::text[]))
 ORDER BY s.id
"""


def usable_workers(asked: int) -> int:
    """``asked`` loader workers, at most one per CPU this process may run on (more only contend;
    the batches and their order are the same for any number of workers)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if asked > cpus:
        if asked not in _capped_workers:
            logger.info("data.num_workers=%d is more than the %d CPUs this process may use: %d loader workers", asked, cpus, cpus)
            _capped_workers.add(asked)
        return cpus
    return asked


_capped_workers: set[int] = set()  # said once per process


def query_manifest(
    conn, datasets: list[str], resolution: int, buckets: Sequence[str] | None = None, kind: str = "images"
) -> Manifest:
    """The ready shards of ``kind`` (single images, or preference pairs) of ``datasets`` at
    ``resolution`` (of the aspect ``buckets`` only, when given), from the ``shards`` table."""
    values = {"datasets": list(datasets), "resolution": resolution, "buckets": None if buckets is None else list(buckets), "kind": kind}
    rows = conn.execute(MANIFEST_SQL, values).fetchall()
    if not rows:
        of_buckets = "" if buckets is None else f" in buckets {list(buckets)}"
        how = "pack them first" if kind == "images" else "ingest pairs (krea2 data ingest-pairs) and pack them (krea2 data pack-pairs) first"
        raise ValueError(f"no ready shards of {kind} for datasets {list(datasets)} at resolution {resolution}{of_buckets}: {how}")
    return Manifest([ShardInfo(*row) for row in rows])


def pinned_manifest(
    path: str | Path, store, datasets: list[str], resolution: int, buckets: Sequence[str] | None = None, kind: str = "images"
) -> Manifest:
    """The manifest pinned at ``path`` (the run directory's), or query the store and pin it.

    A run pins its manifest once, so a resumed run reads exactly the shards it started with even
    after new shards were packed or old ones quarantined.
    """
    path = Path(path)
    if path.exists():
        return Manifest.load(path)
    with store.pool.connection() as conn:
        manifest = query_manifest(conn, datasets, resolution, buckets, kind)
    manifest.save(path)
    return manifest
