"""The training data of a run: registry shards, a pinned manifest and the deterministic loader.

``data.source=shapes`` first makes the data: rank 0 renders the shapes world once under
``runs_root/_datasets``, registers it (``krea2 data ingest``) and packs it at this stage's image
size (``krea2 data work --job pack`` does the same for other datasets), all idempotent, so the
stages of a chain share one dataset. ``data.source=registry`` trains on shards packed beforehand.
With ``data.balance`` (midtraining) or ``data.curate`` (SFT) enabled, the stage trains on a
selection derived from that dataset (``krea2_train.curate.balance``), packed like it. A stage that
reads preference pairs (``stpo.loser=dataset``: :func:`reads_pairs`) trains on the pairs of
``data.dataset`` (:mod:`krea2_train.data.pairs`; the shapes world's are rendered and registered
first), packed at this size into shards of pairs.

The run pins its manifest (the shard list) in ``run_dir/manifest.json``, and the data settings
that chose it in ``run_dir/manifest_settings.json``; the sample order is a pure function of the
manifest, seed and global batch size (``krea2_train.data.plan``). A start whose data settings
differ from the pinned ones pins the data again when the run has no checkpoint yet (a first start
that failed), and is refused, naming the keys, when it has one. Leases and
progress go to PostgreSQL through a ``LeaseKeeper`` per rank; the order never depends on them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

from krea2_train.config.load import to_record
from krea2_train.config.schema import RunConfig
from krea2_train.data.loader import LoaderConfig, ShardLoader, pinned_manifest
from krea2_train.errors import UsageError
from krea2_train.files import write_text
from krea2_train.parallel.distributed import broadcast_object
from krea2_train.store.leases import LeaseKeeper

logger = logging.getLogger("krea2_train")

MANIFEST_SETTINGS_NAME = "manifest_settings.json"

SHAPES_RENDER_MIN_SIDE = 256  # render once at least this large; packing resizes per stage


def shapes_dataset_name(config: RunConfig, render_side: int, folder: Path) -> str:
    """Registry name of a rendered shapes world: its settings plus its folder (URIs are paths, so
    two runs roots sharing one database must not share a dataset name)."""
    folder_key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:8]
    return f"{config.data.dataset}_{render_side}px_n{config.data.num_samples}_s{config.seed}_{folder_key}"


def prepare_shapes(store, config: RunConfig, runs_root: Path, image_side: int, pixel_multiple: int) -> str:
    """Render, register and pack the shapes world for this image size; returns the dataset name."""
    from krea2_train.data.ingest import ingest
    from krea2_train.data.pack import PackSettings

    folder, dataset = render_shapes(config, runs_root, image_side, "images")
    ingest(store, dataset, folder=folder)
    settings = PackSettings(aspect_ratios=tuple(config.data.buckets), pixel_multiple=pixel_multiple, shard_size=256, seed=config.seed)
    # no dedup on the shapes world: its perceptual hash would merge distinct scenes of plain
    # shapes on plain backgrounds
    return process_select_pack(store, config, dataset, ("decode",), image_side, runs_root / "_shards", settings, pack_source=False)


def render_shapes(config: RunConfig, runs_root: Path, image_side: int, kind: str) -> tuple[Path, str]:
    """(folder, registry name) of the shapes world's ``kind`` ("images", or preference "pairs")
    for this image size, rendered once under ``runs_root/_datasets`` (at least
    SHAPES_RENDER_MIN_SIDE; packing resizes per stage)."""
    from krea2_train.data.shapes import write_shapes_dataset, write_shapes_pairs

    render_side = max(SHAPES_RENDER_MIN_SIDE, image_side)
    buckets = "" if list(config.data.buckets) == ["1:1"] else "_b" + hashlib.sha1(",".join(sorted(config.data.buckets)).encode()).hexdigest()[:8]
    infix = "_pairs" if kind == "pairs" else ""
    folder = runs_root / "_datasets" / f"{config.data.dataset}{infix}_{render_side}px_n{config.data.num_samples}_s{config.seed}{buckets}"
    dataset = ("pairs_" if kind == "pairs" else "") + shapes_dataset_name(config, render_side, folder)
    if not (folder / ".complete").exists():
        logger.info("rendering %d shapes-world %s at %d px into %s", config.data.num_samples, kind, render_side, folder)
        write = write_shapes_pairs if kind == "pairs" else write_shapes_dataset
        write(folder, config.data.num_samples, render_side, seed=config.seed, aspect_ratios=config.data.buckets)
        (folder / ".complete").touch()
    return folder, dataset


def process_select_pack(
    store,
    config: RunConfig,
    source: str,
    jobs: tuple[str, ...],
    image_side: int,
    out_dir: Path,
    settings,
    pack_source: bool,
) -> str:
    """Run the processing ``jobs`` (plus ``filters`` when the stage curates or filters), derive the stage's
    selection of ``source`` and pack it at ``image_side`` (and ``source`` too, with
    ``pack_source``); every part is idempotent. Returns the dataset the stage trains on."""
    from krea2_train.curate.jobs import load_jobs, skip_dedup
    from krea2_train.data.pack import dataset_counts, pack_dataset
    from krea2_train.store.queue import get_job, run_worker

    load_jobs()
    for job in jobs + (("filters",) if config.data.curate.enabled or config.data.quality.enabled else ()):
        run_worker(store, get_job(job), datasets=[source])
    if "dedup" not in jobs:  # a source without duplicates (the shapes world): recorded, so selections may use it
        skip_dedup(store, source)
    for counts in dataset_counts(store, source):
        logger.info("dataset %s: %d images, %d packable; left out: %s", source, counts.images, counts.packable, counts.left_out())
    dataset = training_selection(store, config, source)
    for name in dict.fromkeys((source, dataset) if pack_source else (dataset,)):
        packed_settings = check_packed_buckets(store, name, image_side, config.data.buckets)
        report = pack_dataset(store, name, [image_side], out_dir, packed_settings or settings)
        logger.info("packed %s at %d px: %d new samples", name, image_side, report.num_samples)
        log_unreadable(report)
    return dataset


def log_unreadable(report, listed: int = 5) -> None:
    """Warn about the images (or pairs) a pack skipped because their files could not be read now."""
    if report.unreadable:
        logger.warning(
            "%d images (or pairs) could not be read when packing and are not in the data (they are packed once readable): %s",
            len(report.unreadable), "; ".join(list(report.unreadable.values())[:listed]) + ("; ..." if len(report.unreadable) > listed else ""),
        )


def check_packed_buckets(store, dataset: str, image_side: int, buckets: list[str], kind: str = "images"):
    """The settings of :func:`checked_pack_target`'s target (None without one)."""
    target = checked_pack_target(store, dataset, image_side, buckets, kind)
    return None if target is None else target[1]


def checked_pack_target(store, dataset: str, image_side: int, buckets: list[str], kind: str = "images"):
    """(out_dir, settings) of ``dataset``'s pack target of ``kind`` (images, or preference pairs)
    at ``image_side`` (None without one), once its aspect ratios are known to include every one of
    ``buckets`` (``data.buckets``).

    The registry packs a dataset at a size once, with one list of buckets; a run reads the shards
    of its own buckets from it (the images in the other buckets are left out, with a warning).

    Raises:
        UsageError: a bucket of ``buckets`` is not packed at this size.
    """
    from krea2_train.data.pack import find_pack_target

    target = find_pack_target(store, dataset, image_side, kind)
    if target is None:
        return None
    settings = target[1]
    missing = [bucket for bucket in buckets if bucket not in settings.aspect_ratios]
    if missing:
        raise UsageError(
            f"data.buckets asks for {missing}, and dataset {dataset!r} is packed at {image_side} px in buckets"
            f" {list(settings.aspect_ratios)} only: set data.buckets to some of those, or ingest the {kind} as another"
            f" dataset (krea2 data {'ingest' if kind == 'images' else 'ingest-pairs'} --dataset NAME) to pack them with other buckets"
        )
    others = [bucket for bucket in settings.aspect_ratios if bucket not in buckets]
    if others:
        logger.warning(
            "dataset %s is packed at %d px in buckets %s too; data.buckets=%s trains on its own buckets only, so the"
            " %s packed in those are left out", dataset, image_side, others, list(buckets), kind,
        )
    return target


def training_selection(store, config: RunConfig, dataset: str) -> str:
    """The dataset a stage trains on: ``dataset``, without its extreme images (``data.quality``),
    then its balanced selection (``data.balance``, midtraining) or its curated subset
    (``data.curate``, SFT). A selection is derived once: its name is a digest of its settings and
    source images, and deriving it again returns it."""
    from krea2_train.curate.balance import (
        balance_dataset,
        curate_dataset,
        filter_dataset,
        ids_digest,
        selectable_images,
        selection_name,
    )
    from krea2_train.curate.concepts import ConceptListError, read_concepts
    from krea2_train.curate.kmeans import KMeansSettings

    balance, curate, quality = config.data.balance, config.data.curate, config.data.quality
    if quality.enabled:
        _, image_ids, _ = selectable_images(store, dataset)
        minimum, maximum = dict(quality.minimum), dict(quality.maximum)
        key = {"minimum": minimum, "maximum": maximum, "images": ids_digest(image_ids)}
        report = filter_dataset(store, dataset, selection_name(dataset, "filter", key), minimum, maximum)
        logger.info("quality filter: %d of %d images of %s kept (%s)", report.num_images, len(image_ids), dataset, report.name)
        dataset = report.name
    if not (balance.enabled or curate.enabled):
        return dataset
    _, image_ids, _ = selectable_images(store, dataset)
    images = ids_digest(image_ids)
    if balance.enabled:
        settings = KMeansSettings(
            tuple(balance.levels), balance.resample_steps, balance.points_per_cluster, seed=config.seed,
            train_points_per_cluster=balance.train_points_per_cluster,
        )
        key = {
            "target": balance.target, "embedder": balance.embedder, "leaf_pick": balance.leaf_pick, "images": images,
            **settings.to_json(), "semantic_dedup": balance.semantic_dedup,
        }
        if not balance.target:  # a fraction of the images left after semantic dedup
            key["fraction"] = balance.fraction
        concepts = None
        if balance.concepts is not None:
            try:
                concepts = read_concepts(balance.concepts)
            except ConceptListError as error:
                raise UsageError(f"data.balance.concepts: {error}") from None
            key |= {"concepts": concepts.sha256, "images_per_concept": balance.images_per_concept, "concept_share": balance.concept_share}
        report = balance_dataset(
            store, dataset, selection_name(dataset, "balance", key), balance.target, settings, balance.embedder,
            balance.leaf_pick, balance.semantic_dedup, balance.fraction,
            concepts=concepts, images_per_concept=balance.images_per_concept, concept_share=balance.concept_share,
        )
    else:
        top = curate.top or max(1, round(curate.fraction * len(image_ids)))
        key = {"top": top, "by": curate.by, "order": curate.order, "images": images}
        report = curate_dataset(store, dataset, selection_name(dataset, "curate", key), top, curate.by, curate.order)
    logger.info("training on %s: %d of %d images of %s (%s)", report.name, report.num_images, len(image_ids), dataset, report.method)
    return report.name


def reads_pairs(config: RunConfig) -> bool:
    """Whether the stage trains on preference pairs (winner and loser from the data) rather than images."""
    return config.stage.kind == "stpo" and config.stpo.loser == "dataset"


def prepare_pairs(store, config: RunConfig, runs_root: Path, image_side: int, pixel_multiple: int) -> str:
    """The preference pairs of ``data.dataset`` packed at this image size; returns the dataset name.

    With ``data.source=shapes`` the shapes world's pairs (:func:`~krea2_train.data.shapes.make_pair`,
    ``data.num_samples`` of them) are rendered and registered first. The pairs' images are
    decoded (the ``decode`` job) before packing, which follows the dataset's pack target of pairs
    at this size when it has one (``krea2 data pack-pairs``: its folder and settings; its buckets
    must include ``data.buckets``, see :func:`check_packed_buckets`); every part is idempotent.

    Raises:
        UsageError: a selection (``data.balance``, ``data.curate``, ``data.quality``) is on: those
            choose images, not pairs.
    """
    from krea2_train.curate.jobs import load_jobs
    from krea2_train.data.pack import PackSettings
    from krea2_train.data.pairs import ingest_pairs, pack_pairs
    from krea2_train.store.queue import get_job, run_worker

    selections = [f"data.{name}" for name in ("balance", "curate", "quality") if getattr(config.data, name).enabled]
    if selections:
        raise UsageError(
            f"{', '.join(selections)} select(s) images, and stpo.loser=dataset trains on preference pairs: set"
            f" {', '.join(name + '.enabled=false' for name in selections)}, or filter the pairs before ingesting them"
        )
    shard_size = PackSettings().shard_size
    if config.data.source == "shapes":
        folder, dataset = render_shapes(config, runs_root, image_side, "pairs")
        ingest_pairs(store, dataset, folder / "pairs.jsonl")
        shard_size = 256
    else:
        dataset = config.data.dataset
    load_jobs()
    run_worker(store, get_job("decode"), datasets=[dataset])
    out_dir, settings = checked_pack_target(store, dataset, image_side, config.data.buckets, kind="pairs") or (
        runs_root / "_shards",
        PackSettings(aspect_ratios=tuple(config.data.buckets), pixel_multiple=pixel_multiple, shard_size=shard_size, seed=config.seed),
    )
    report = pack_pairs(store, dataset, [image_side], out_dir, settings)
    logger.info("packed the preference pairs of %s at %d px: %d new pairs", dataset, image_side, report.num_samples)
    log_unreadable(report)
    return dataset


def prepare_registry(store, config: RunConfig, runs_root: Path, image_side: int, pixel_multiple: int) -> str:
    """``data.dataset`` (or its selection) packed at this image size.

    A dataset not yet packed at this size is processed first, idempotently: decode and size
    checks, dedup, then resize-and-pack (what ``krea2 data work --job decode|dedup`` and the pack
    job do), so ``krea2 data ingest`` followed by a training run is enough.
    """
    from krea2_train.data.pack import PackSettings, find_pack_target

    source = config.data.dataset
    out_dir, settings = find_pack_target(store, source, image_side) or (
        runs_root / "_shards",
        PackSettings(aspect_ratios=tuple(config.data.buckets), pixel_multiple=pixel_multiple, seed=config.seed),
    )
    return process_select_pack(store, config, source, ("decode", "dedup"), image_side, out_dir, settings, pack_source=True)


class TrainLoader:
    """Endless batches for the trainer (epoch after epoch) with the loader's checkpoint state.

    Yields dicts: ``images [b, 3, H, W]`` in [-1, 1], ``captions`` (b strings), ``facts`` (b
    dicts, see :class:`~krea2_train.data.loader.Batch`), ``sample_ids``, in a run on preference
    pairs ``loser_images [b, 3, H, W]`` (the loser of each winner in ``images``),
    ``epoch`` and ``epoch_fraction`` (the part of the epoch done after this batch),
    ``new_bad_shards`` (shard id -> error: the unreadable shards first found in this batch, now
    quarantined) and ``bad_shards_total`` (how many this rank has found so far).
    """

    def __init__(self, loader: ShardLoader, store=None, lease_keeper: LeaseKeeper | None = None, dsn: str | None = None) -> None:
        self.loader = loader
        self.store = store
        self.lease_keeper = lease_keeper
        self.dsn = dsn  # the run log's mirror (rank 0)

    @property
    def fenced(self) -> bool:
        """A newer start of the same run took this rank's lease: this process is a leftover (an
        old job still running after its requeue, a second job on the same run name) and must stop
        without writing to the run."""
        return self.lease_keeper is not None and self.lease_keeper.lost

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            for batch in self.loader:
                losers = {} if batch.loser_images is None else {"loser_images": batch.loser_images}
                yield losers | {
                    "images": batch.images,
                    "captions": batch.captions,
                    "facts": batch.facts,
                    "sample_ids": batch.sample_ids,
                    "epoch": batch.epoch,
                    "epoch_fraction": (batch.index + 1) / self.loader.batches_per_epoch,
                    "new_bad_shards": batch.new_bad_shards,
                    "bad_shards_total": len(self.loader.quarantined),
                }

    def close(self) -> None:
        if self.lease_keeper is not None:
            self.lease_keeper.close()
        if self.store is not None:
            self.store.close()


def check_bucket_sizes(manifest, global_batch_size: int, warn: bool = True) -> None:
    """Refuse a global batch larger than every aspect bucket; warn about buckets too small for one
    batch (their images never train: the plan never mixes buckets in a batch).

    Raises:
        StageConfigError: no bucket holds ``global_batch_size`` samples.
    """
    from krea2_train.stages.base import StageConfigError

    sizes = manifest.bucket_sizes
    listed = ", ".join(f"{name}: {count}" for name, count in sizes.items())
    if max(sizes.values()) < global_batch_size:
        raise StageConfigError(
            f"data.global_batch_size={global_batch_size} is larger than every aspect bucket of the data ({listed} images): "
            f"lower data.global_batch_size (at most {max(sizes.values())}) or use fewer aspect buckets (data.buckets)"
        )
    small = {name: count for name, count in sizes.items() if count < global_batch_size}
    if small and warn:
        logger.warning(
            "%d images in aspect buckets smaller than data.global_batch_size=%d never train (%s): use fewer aspect "
            "buckets (data.buckets) or a smaller batch", sum(small.values()), global_batch_size,
            ", ".join(f"{name}: {count}" for name, count in small.items()),
        )


def manifest_settings(config: RunConfig, image_side: int) -> dict[str, Any]:
    """The settings that choose a run's shards, by dotted config key (what ``manifest_settings.json``
    pins): the buckets as a set, and of a selection section that is off only ``enabled``."""
    data = to_record(config)["data"]
    settings: dict[str, Any] = {
        "data.source": data["source"], "data.dataset": data["dataset"], "data.resolution": data["resolution"],
        "data.buckets": sorted(data["buckets"]), "seed": config.seed, "image side in pixels": image_side,
        "preference pairs (stpo.loser=dataset)": reads_pairs(config),
    }
    if config.data.source == "shapes":
        settings["data.num_samples"] = data["num_samples"]
    for section in ("balance", "curate", "quality"):
        values = data[section]
        if not values["enabled"]:
            settings[f"data.{section}.enabled"] = False
            continue
        for key, value in values.items():
            if isinstance(value, dict):  # quality's bounds: one key per score
                settings.update({f"data.{section}.{key}.{name}": bound for name, bound in value.items()})
            else:
                settings[f"data.{section}.{key}"] = value
    return settings


def check_pinned_data(run_dir: Path, wanted: dict[str, Any], fresh_start: bool) -> bool:
    """Whether the run's pinned manifest may be read by a start with the data settings ``wanted``:
    True when they are the pinned ones (or the run predates the record); False when they differ
    and the run has no checkpoint (its data is pinned again).

    Raises:
        UsageError: they differ and the run has checkpoints, which trained on the pinned data.
    """
    settings_path = run_dir / MANIFEST_SETTINGS_NAME
    if not (run_dir / "manifest.json").exists() or not settings_path.exists():
        return True
    pinned = json.loads(settings_path.read_text())
    # a key the pin does not have (a setting newer than the run) cannot be compared: it is taken
    changed = [key for key in wanted if key in pinned and pinned[key] != wanted[key]]
    if not changed:
        return True
    described = "; ".join(f"{key} {json.dumps(pinned.get(key))} pinned, {json.dumps(wanted[key])} now" for key in changed)
    if not fresh_start:
        raise UsageError(
            f"run {run_dir.name!r} trains on data pinned with other settings ({described}); its checkpoints trained on"
            " that data, so the sample order cannot change: set them back, or start a new run_name"
        )
    logger.warning("the data settings changed since the run's data was pinned, before any checkpoint (%s): pinning it again", described)
    return False


def build_train_loader(
    config: RunConfig,
    run_dir: Path,
    *,
    dp_rank: int,
    dp_size: int,
    image_side: int,
    pixel_multiple: int,
    is_main: bool,
    barrier: Callable[[], None],
    fresh_start: bool,
    holds_lease: bool = True,
) -> TrainLoader:
    """The run's loader for data-parallel rank ``dp_rank`` of ``dp_size``.

    ``holds_lease``: this process records the rank's leases (one process per data-parallel rank:
    tensor-parallel peers read the same samples and do not). ``fresh_start``: the run has no
    checkpoint yet (its data may be pinned again, see :func:`check_pinned_data`).
    """
    from krea2_train.store import StoreUnavailable, default_store_dir, open_store
    from krea2_train.store.db import resolve_dsn

    runs_root = Path(config.runs_root)
    manifest_path = run_dir / "manifest.json"
    kind = "pairs" if reads_pairs(config) else "images"
    wanted = manifest_settings(config, image_side)
    keep_pinned = check_pinned_data(run_dir, wanted, fresh_start)  # every rank: a refusal stops them all
    store = dsn = None
    if is_main:
        try:
            store = open_store(config.data.dsn, data_dir=default_store_dir(runs_root))
            dsn = store.dsn
        except StoreUnavailable as error:
            dsn = resolve_dsn(config.data.dsn)
            if not (keep_pinned and manifest_path.exists() and dsn):  # (a refused DSN is StoreRefused: raised)
                raise
            # a restart during a database outage: the sample order is the pinned manifest's and
            # the checkpoint's, so training goes on; the lease keeper writes once the server answers
            logger.warning(
                "%s; the run's data is pinned in %s, so it trains on without the database: its leases and progress are"
                " written once the database answers", error, manifest_path,
            )
        if not keep_pinned:
            manifest_path.unlink()
        if not manifest_path.exists():
            write_text(run_dir / MANIFEST_SETTINGS_NAME, json.dumps(wanted, indent=1, sort_keys=True))
            if kind == "pairs":
                dataset = prepare_pairs(store, config, runs_root, image_side, pixel_multiple)
            elif config.data.source == "shapes":
                dataset = prepare_shapes(store, config, runs_root, image_side, pixel_multiple)
            else:
                dataset = prepare_registry(store, config, runs_root, image_side, pixel_multiple)
            pinned_manifest(manifest_path, store, [dataset], image_side, buckets=config.data.buckets, kind=kind)
    barrier()  # first: the others wait for the preparation here, on the host, with its own timeout
    dsn = broadcast_object(dsn)
    from krea2_train.data.plan import Manifest

    manifest = Manifest.load(manifest_path)
    if manifest.kind != kind:  # a run pinned before its data settings were recorded
        raise UsageError(
            f"run {run_dir.name!r} has pinned shards of {manifest.kind}, and this stage trains on {kind}"
            f" (stpo.loser={config.stpo.loser}): set stpo.loser back, or start a new run_name"
        )
    empty = sorted(set(config.data.buckets) - set(manifest.buckets))
    if empty and is_main:
        logger.warning("no image of the data falls in the aspect bucket(s) %s of data.buckets at %d px", empty, image_side)
    check_bucket_sizes(manifest, config.data.global_batch_size, warn=is_main)
    loader_config = LoaderConfig(
        global_batch_size=config.data.global_batch_size,
        seed=config.seed,
        caption_mix=dict(config.data.caption_mix),
        num_workers=config.data.num_workers,
    )
    loader = ShardLoader(manifest, loader_config, rank=dp_rank, world_size=dp_size)
    lease_keeper = None
    if holds_lease:
        lease_keeper = LeaseKeeper(dsn, loader.run_info(config.run_name), dp_rank).start()
        loader.lease_keeper = lease_keeper
    return TrainLoader(loader, store, lease_keeper, dsn=dsn if is_main else None)
