"""Resize-and-pack: decoded, non-duplicate images -> pre-shuffled shards, one bucket per shard.

For each resolution: select the dataset's images that are decoded, not duplicates, have a long
caption and are not yet packed at that resolution (``shard_samples``); assign each its bucket
from its stored size; shuffle each bucket's images with a key of (seed, resolution, bucket);
cut them into shards of ``shard_size``; resize every image into its bucket (cover, centre crop)
and encode it; write each shard and register it, with its ``shard_samples`` rows, in one
transaction. Re-running packs only what is new, so it never duplicates a shard or a sample.
A shard's file name is a digest of its sample ids, so a shard written but not registered (a
crash between the two) is simply rewritten under the same name.

An image whose shard at a resolution was quarantined (the loader found it unreadable) counts as
not packed there: the next pack writes it into a new shard (named ``DIGEST-N.arrow`` when a
quarantined shard holds ``DIGEST.arrow``, the same images) and moves its ``shard_samples`` row
from the quarantined shard to the new one.

Two entry points: ``pack_dataset(store, dataset, resolutions, out_dir)``, and the ``pack`` job
(``krea2 data work --job pack``), which packs each claimed batch of images for every
``pack_targets`` row of its dataset (``add_pack_target`` or ``pack_dataset`` adds them). The job
follows the ``dedup`` job: an image is packed once dedup has judged it.

Packers of one (dataset, resolution, kind) take turns (:func:`pack_lock`): a whole-dataset pack
(``pack_dataset``, ``pack_pairs``, a training run's first start) holds it alone, the job's
workers share it (their claimed batches are disjoint). Each reads what is packed already once it
holds the lock, so two runs starting together on a new dataset, or a run starting while pack
workers run, never pack an image twice.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

from krea2_train.curate.images import open_rgb
from krea2_train.data.buckets import (
    DEFAULT_ASPECT_RATIOS,
    Bucket,
    assign_bucket,
    make_buckets,
    parse_aspect_ratio,
    resize_to_bucket,
)
from krea2_train.data.plan import bucket_key, keyed_permutation
from krea2_train.data.shards import ShardWriter, WrittenShard
from krea2_train.logs import Progress
from krea2_train.store import Store
from krea2_train.store.db import find_dataset_id
from krea2_train.store.queue import Done, Failed, Job, JobContext, Outcome, register_job, requeue_dataset

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("id", "dataset_id", "uri", "width", "height", "caption_long", "caption_medium", "caption_short", "facts")
PACK_JOB_NAME = "pack"
UNCAPTIONED_SQL = "coalesce(i.caption_long, '') = ''"
PACKABLE_SQL = f"i.decode_ok AND i.duplicate_of IS NULL AND NOT {UNCAPTIONED_SQL}"
# dedup has judged the image: before, duplicate_of IS NULL means "not computed yet", not "unique"
DEDUP_DONE_SQL = "EXISTS (SELECT 1 FROM job_runs d WHERE d.job = 'dedup' AND d.image_id = i.id AND d.state = 'done')"
# the shard_samples rows (alias s) of shards that were not quarantined
LIVE_SHARD_SAMPLES_SQL = "shard_samples s JOIN shards h ON h.id = s.shard_id AND h.state <> 'quarantined'"
# the shard_pairs rows (alias s) of shards of preference pairs that were not quarantined
LIVE_SHARD_PAIRS_SQL = "shard_pairs s JOIN shards h ON h.id = s.shard_id AND h.state <> 'quarantined'"
SIZES_PAGE = 100_000  # images whose sizes pack_dataset reads at a time


@dataclass(frozen=True)
class DatasetCounts:
    """A dataset's images by what packing makes of them: ``packable`` ones go into shards; the
    others are left out as ``unchecked`` (the decode job has not seen them), ``undecodable``,
    ``duplicates`` (dedup kept another copy) or ``uncaptioned`` (no long caption)."""

    name: str
    images: int
    packable: int
    unchecked: int
    undecodable: int
    duplicates: int
    uncaptioned: int

    def left_out(self) -> str:
        """'12 undecodable, 3 duplicates' (the non-zero reasons), or 'none'."""
        reasons = {"not yet decoded": self.unchecked, "undecodable": self.undecodable,
                   "duplicates": self.duplicates, "without a long caption": self.uncaptioned}  # fmt: skip
        return ", ".join(f"{count} {reason}" for reason, count in reasons.items() if count) or "none"


def dataset_counts(store: Store, dataset: str | None = None) -> list[DatasetCounts]:
    """:class:`DatasetCounts` of ``dataset`` (every dataset when None), by name. An image is
    counted under its first reason, in the order of the fields."""
    counts = (
        "count(i.id),"
        f" count(*) FILTER (WHERE {PACKABLE_SQL}),"
        " count(*) FILTER (WHERE i.id IS NOT NULL AND i.decode_ok IS NULL),"
        " count(*) FILTER (WHERE i.decode_ok = false),"
        " count(*) FILTER (WHERE i.decode_ok AND i.duplicate_of IS NOT NULL),"
        f" count(*) FILTER (WHERE i.decode_ok AND i.duplicate_of IS NULL AND {UNCAPTIONED_SQL})"
    )
    with store.pool.connection() as conn:
        if dataset is None:
            rows = conn.execute(
                f"SELECT d.name, {counts} FROM datasets d LEFT JOIN images i ON i.dataset_id = d.id GROUP BY d.name ORDER BY d.name"
            ).fetchall()
        else:  # the id as a constant: an index scan of the dataset's rows, not a scan of the registry
            found = conn.execute("SELECT id FROM datasets WHERE name = %s", (dataset,)).fetchone()
            rows = [] if found is None else conn.execute(
                f"SELECT %s::text, {counts} FROM images i WHERE i.dataset_id = %s", (dataset, found[0])
            ).fetchall()
    return [DatasetCounts(*row) for row in rows]


def pack_target_counts(store: Store) -> list[tuple[str, int, str, int, str]]:
    """(dataset, resolution, out_dir, samples packed in live shards, kind) of every pack target;
    the samples are images, or preference pairs for a target of kind ``pairs``."""
    with store.pool.connection() as conn:
        return conn.execute(
            "SELECT d.name, t.resolution, t.out_dir, CASE t.kind"
            f" WHEN 'images' THEN (SELECT count(*) FROM {LIVE_SHARD_SAMPLES_SQL} JOIN images i ON i.id = s.image_id"
            "   WHERE i.dataset_id = t.dataset_id AND s.resolution = t.resolution)"
            f" ELSE (SELECT count(*) FROM {LIVE_SHARD_PAIRS_SQL}"
            "   JOIN preference_pairs p ON p.id = s.pair_id WHERE p.dataset_id = t.dataset_id AND s.resolution = t.resolution) END,"
            " t.kind FROM pack_targets t JOIN datasets d ON d.id = t.dataset_id ORDER BY d.name, t.resolution, t.kind"
        ).fetchall()


@dataclass(frozen=True)
class PackSettings:
    """How images are packed. ``pixel_multiple``: 16 for the Qwen-Image VAE with patch 2, 4 for
    the pixel AE with patch 2. ``quality`` applies to JPEG (PNG and WebP are lossless)."""

    aspect_ratios: tuple[str, ...] = DEFAULT_ASPECT_RATIOS
    pixel_multiple: int = 16
    image_format: str = "png"
    quality: int = 95
    shard_size: int = 1024
    seed: int = 0

    def __post_init__(self):
        if self.shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {self.shard_size}")
        if self.pixel_multiple <= 0:
            raise ValueError(f"pixel_multiple must be positive, got {self.pixel_multiple}")
        if not self.aspect_ratios:
            raise ValueError("at least one aspect ratio bucket is needed")
        for ratio in self.aspect_ratios:  # a bad name stops here, before a pack target holds it
            parse_aspect_ratio(ratio)

    def to_json(self) -> dict:
        return asdict(self) | {"aspect_ratios": list(self.aspect_ratios)}

    @classmethod
    def from_json(cls, values: dict) -> PackSettings:
        return cls(**(values | {"aspect_ratios": tuple(values["aspect_ratios"])}))


@dataclass
class PackReport:
    """What one pack call did: shards written and registered, images that could not be read."""

    shards: list[WrittenShard] = field(default_factory=list)
    unreadable: dict[int, str] = field(default_factory=dict)  # image id -> error

    @property
    def num_samples(self) -> int:
        return sum(shard.num_samples for shard in self.shards)


def find_pack_target(store: Store, dataset: str, resolution: int, kind: str = "images") -> tuple[Path, PackSettings] | None:
    """(out_dir, settings) of ``dataset``'s pack target of ``kind`` (images, or preference pairs)
    at ``resolution``; None without one."""
    with store.pool.connection() as conn:
        row = conn.execute(
            "SELECT t.out_dir, t.settings FROM pack_targets t JOIN datasets d ON d.id = t.dataset_id"
            " WHERE d.name = %s AND t.resolution = %s AND t.kind = %s",
            (dataset, resolution, kind),
        ).fetchone()
    return None if row is None else (Path(row[0]), PackSettings.from_json(row[1]))


def add_pack_target(
    store: Store, dataset: str, resolution: int, out_dir: str | Path, settings: PackSettings, kind: str = "images"
) -> int:
    """Record that ``dataset``'s images (or, with ``kind="pairs"``, its preference pairs) are packed
    at ``resolution`` into ``out_dir``; returns the dataset id.

    A new target of images sends the dataset's images that the ``pack`` job has finished or is
    packing now back to pending, so the job packs them at the new resolution too (it skips what
    is packed already; a batch in flight, which read the targets before this one, is fenced out).
    The target is committed before the rows go back: a batch claimed in between reads it. Pairs
    are packed by :func:`krea2_train.data.pairs.pack_pairs`, not by the job."""
    with store.pool.connection() as conn:
        target_dataset = find_dataset_id(conn, dataset)
        key = (target_dataset, resolution, kind)
        (requeue_pending,) = conn.execute(
            "INSERT INTO pack_targets (dataset_id, resolution, out_dir, settings, kind, requeue_pending)"
            " VALUES (%s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (dataset_id, resolution, kind) DO UPDATE SET out_dir = excluded.out_dir, settings = excluded.settings"
            " RETURNING requeue_pending",
            (target_dataset, resolution, str(Path(out_dir).resolve()), Jsonb(settings.to_json()), kind, kind == "images"),
        ).fetchone()  # committed here (autocommit), before the rows go back
        if requeue_pending:  # new, or a requeue cut short: send the rows back (again)
            requeue_dataset(conn, PACK_JOB_NAME, target_dataset, states=("done", "running"))
            conn.execute("UPDATE pack_targets SET requeue_pending = false WHERE dataset_id = %s AND resolution = %s AND kind = %s", key)
    return target_dataset


@contextmanager
def pack_lock(store: Store, dataset_id: int, resolution: int, kind: str = "images", *, shared: bool = False) -> Iterator[None]:
    """Hold the packers' lock of (``dataset_id``, ``resolution``, ``kind``): alone, or with
    ``shared`` beside the other shared holders (the ``pack`` job's workers). A session-level
    advisory lock on a connection of its own, so a packer that dies releases it with its socket.
    Waiting for it is logged."""
    suffix = "_shared" if shared else ""
    try_lock, lock, unlock = (f"pg_try_advisory_lock{suffix}", f"pg_advisory_lock{suffix}", f"pg_advisory_unlock{suffix}")
    key = ("krea2-pack", f"{dataset_id}:{resolution}:{kind}")
    with store.pool.connection() as conn:
        (held,) = conn.execute(f"SELECT {try_lock}(hashtext(%s), hashtext(%s))", key).fetchone()
        if not held:
            logger.info("dataset %d at %d px: waiting for another packer of its %s to finish", dataset_id, resolution, kind)
            conn.execute(f"SELECT {lock}(hashtext(%s), hashtext(%s))", key)
        try:
            yield
        finally:
            try:
                conn.execute(f"SELECT {unlock}(hashtext(%s), hashtext(%s))", key)
            except psycopg.OperationalError:  # the session is gone, and its lock with it; or the unlock
                conn.close()  # was cancelled: the pool must not hand out a connection that holds the lock


def pack_dataset(
    store: Store,
    dataset: str,
    resolutions: Sequence[int],
    out_dir: str | Path,
    settings: PackSettings = PackSettings(),
) -> PackReport:
    """Pack every not-yet-packed image of ``dataset`` at each resolution (see module docstring),
    each resolution holding the dataset's :func:`pack_lock` there."""
    if not resolutions:
        raise ValueError("resolutions is empty")
    report = PackReport()
    for resolution in resolutions:
        dataset_id = add_pack_target(store, dataset, resolution, out_dir, settings)
        with pack_lock(store, dataset_id, resolution):
            sizes = unpacked_image_sizes(store, dataset_id, resolution)
            pack_rows(store, dataset, dataset_id, sizes, resolution, Path(out_dir), settings, report, lambda ids: load_image_rows(store, ids))
    return report


def unpacked_image_sizes(store: Store, dataset_id: int, resolution: int) -> Iterator[tuple[int, int, int]]:
    """(id, width, height) of the dataset's packable images not packed at ``resolution``, in id
    order, read SIZES_PAGE rows at a time (a dataset's captions never sit in memory at once)."""
    return keyset_pages(
        store,
        f"SELECT i.id, i.width, i.height FROM images i WHERE i.dataset_id = %s AND {PACKABLE_SQL}"
        f" AND NOT EXISTS (SELECT 1 FROM {LIVE_SHARD_SAMPLES_SQL} WHERE s.image_id = i.id AND s.resolution = %s)"
        " AND i.id > %s ORDER BY i.id LIMIT %s",
        (dataset_id, resolution),
    )


def keyset_pages(store: Store, query: str, params: tuple) -> Iterator[tuple]:
    """The rows of ``query``, SIZES_PAGE at a time, each page on a connection of its own.

    ``query`` selects the key first and ends with ``KEY > %s ORDER BY KEY LIMIT %s``; ``params``
    fill its other placeholders, in order."""
    after = 0
    while True:
        with store.pool.connection() as conn:
            page = conn.execute(query, (*params, after, SIZES_PAGE)).fetchall()
        yield from page
        if len(page) < SIZES_PAGE:
            return
        after = page[-1][0]


def load_image_rows(store: Store, image_ids: Sequence[int]) -> list[dict]:
    """Dicts of ``IMAGE_COLUMNS`` for ``image_ids``, in their order."""
    with store.pool.connection() as conn:
        rows = conn.execute(
            f"SELECT {', '.join('i.' + c for c in IMAGE_COLUMNS)} FROM images i WHERE i.id = ANY(%s)", (list(image_ids),)
        ).fetchall()
    by_id = {values[0]: dict(zip(IMAGE_COLUMNS, values)) for values in rows}
    return [by_id[image_id] for image_id in image_ids]


def pack_rows(
    store: Store,
    dataset: str,
    dataset_id: int,
    sizes: Iterable[tuple[int, int, int]],
    resolution: int,
    out_dir: Path,
    settings: PackSettings,
    report: PackReport,
    load: Callable[[list[int]], list[dict]],
    kind: str = "images",
) -> None:
    """Pack the images ``sizes`` lists (``(id, width, height)``, sorted by id) at ``resolution``
    into ``report``. Only their ids are kept per bucket (8 bytes an image); ``load(ids)`` gives
    the rows (dicts of ``IMAGE_COLUMNS``) of one shard when it is written.

    ``kind="pairs"`` packs preference pairs (:mod:`krea2_train.data.pairs`): the ids are pair ids,
    the size is the winner's, and each row also has a ``loser_uri``, resized into the same bucket."""
    buckets = make_buckets(resolution, settings.pixel_multiple, settings.aspect_ratios)
    by_bucket: dict[str, array] = {}
    for image_id, width, height in sizes:
        by_bucket.setdefault(assign_bucket(width, height, buckets).name, array("q")).append(image_id)
    progress = Progress(f"packed {dataset} at {resolution} px:", sum(map(len, by_bucket.values())), kind, logger)
    done = 0
    for bucket in buckets:
        members = by_bucket.pop(bucket.name, array("q"))
        order = keyed_permutation(len(members), (settings.seed, resolution, bucket_key(bucket.name)))
        for start in range(0, len(members), settings.shard_size):
            chunk = load([members[i] for i in order[start : start + settings.shard_size]])
            written = _write_shard(store, dataset, chunk, resolution, bucket, out_dir, settings, report, kind)
            if written is not None and _register(store, dataset_id, resolution, written):
                report.shards.append(written)
            done += len(chunk)
            progress.update(done)


def shard_path(out_dir: Path, dataset: str, resolution: int, bucket: Bucket, sample_ids: Sequence[int], kind: str = "images") -> Path:
    """Where a shard of ``sample_ids`` goes; shards of pairs under ``pairs/`` (a pair id may equal an image id)."""
    digest = hashlib.sha256(",".join(map(str, sample_ids)).encode()).hexdigest()[:20]
    folder = out_dir / dataset / f"r{resolution}" / ("pairs" if kind == "pairs" else "")
    return folder / bucket.name.replace(":", "x") / f"{digest}.arrow"


def unquarantined_path(store: Store, path: Path) -> Path:
    """``path``, or when a quarantined shard is registered under it (a repack of the same
    images), the first ``STEM-N.arrow`` (N = 1, 2, ...) that none is."""
    with store.pool.connection() as conn:
        for generation in itertools.count():
            candidate = path if generation == 0 else path.with_name(f"{path.stem}-{generation}{path.suffix}")
            quarantined = conn.execute(
                "SELECT 1 FROM shards WHERE path = %s AND state = 'quarantined'", (str(candidate.resolve()),)
            ).fetchone()
            if quarantined is None:
                return candidate


def _write_shard(store, dataset, chunk, resolution, bucket, out_dir, settings, report, kind) -> WrittenShard | None:
    path = unquarantined_path(store, shard_path(out_dir, dataset, resolution, bucket, [row["id"] for row in chunk], kind))
    writer = ShardWriter(
        path, resolution=resolution, bucket=bucket, image_format=settings.image_format,
        quality=settings.quality, dataset=dataset, kind=kind,
    )
    with writer:
        for row in chunk:
            uris = [row["uri"], row["loser_uri"]] if kind == "pairs" else [row["uri"]]
            try:
                image, *loser = [resize_to_bucket(open_rgb(uri), bucket) for uri in uris]
            except Exception as error:  # a file that vanished or changed since decode: skip it
                report.unreadable[row["id"]] = f"{' / '.join(uris)}: {type(error).__name__}: {error}"
                continue
            captions = {"long": row["caption_long"], "medium": row["caption_medium"], "short": row["caption_short"]}
            writer.write(row["id"], image, captions, row["facts"], loser=loser[0] if loser else None)
        if not writer.sample_ids:
            writer.abort()
            return None
        return writer.close()


# the table that records which shard row holds each sample, and its sample column, by shard kind
SHARD_MEMBERS = {"images": ("shard_samples", "image_id"), "pairs": ("shard_pairs", "pair_id")}


def _register(store: Store, dataset_id: int, resolution: int, shard: WrittenShard) -> bool:
    """Insert the shard and its samples (``shard.sample_ids``, row by row) in one transaction,
    taking over the samples' rows of quarantined shards; False if the path was registered."""
    table, column = SHARD_MEMBERS[shard.header.kind]
    with store.pool.connection() as conn, conn.transaction():
        row = conn.execute(
            "INSERT INTO shards (dataset_id, resolution, bucket, width, height, path, num_samples, sha256, image_format, kind)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (path) DO NOTHING RETURNING id",
            (dataset_id, resolution, shard.header.bucket, shard.header.width, shard.header.height,
             str(shard.path.resolve()), shard.num_samples, shard.sha256, shard.header.image_format, shard.header.kind),
        ).fetchone()
        if row is None:
            return False
        conn.execute(
            f"DELETE FROM {table} s USING shards h WHERE h.id = s.shard_id AND h.state = 'quarantined'"
            f" AND s.resolution = %s AND s.{column} = ANY(%s)",
            (resolution, list(shard.sample_ids)),
        )
        conn.execute(
            f'INSERT INTO {table} (resolution, {column}, shard_id, "row")'
            " SELECT %s, u.sample_id, %s, u.ord - 1 FROM unnest(%s::bigint[]) WITH ORDINALITY AS u (sample_id, ord)",
            (resolution, row[0], list(shard.sample_ids)),
        )
    return True


def pack_job_handler(rows: list[dict], ctx: JobContext) -> list[Outcome]:
    """The ``pack`` job: pack a claimed batch for every pack target of its datasets."""
    unreadable: dict[int, str] = {}
    with ctx.store.pool.connection() as conn:
        targets = conn.execute(
            "SELECT t.dataset_id, d.name, t.resolution, t.out_dir, t.settings FROM pack_targets t"
            " JOIN datasets d ON d.id = t.dataset_id WHERE t.dataset_id = ANY(%s) AND t.kind = 'images'"
            " ORDER BY t.dataset_id, t.resolution",
            (sorted({row["dataset_id"] for row in rows}),),
        ).fetchall()
    by_id = {row["id"]: row for row in rows}

    def rows_of(image_ids: list[int]) -> list[dict]:
        ctx.check_lease()  # before each shard: stop once the batch is another worker's
        return [by_id[image_id] for image_id in image_ids]

    for dataset_id, dataset, resolution, out_dir, settings in targets:
        ours = sorted(r["id"] for r in rows if r["dataset_id"] == dataset_id)
        with pack_lock(ctx.store, dataset_id, resolution, shared=True):
            with ctx.store.pool.connection() as conn:  # read under the lock: a whole-dataset pack may just have packed them
                packed = {image_id for (image_id,) in conn.execute(
                    f"SELECT s.image_id FROM {LIVE_SHARD_SAMPLES_SQL} WHERE s.resolution = %s AND s.image_id = ANY(%s)",
                    (resolution, ours),
                )}  # fmt: skip
            todo = [(i, by_id[i]["width"], by_id[i]["height"]) for i in ours if i not in packed]
            report = PackReport()
            pack_rows(
                ctx.store, dataset, dataset_id, todo, resolution, Path(out_dir), PackSettings.from_json(settings), report, rows_of,
            )
        unreadable |= report.unreadable
    return [Failed(unreadable[row["id"]]) if row["id"] in unreadable else Done({}) for row in rows]


PACK_JOB = register_job(
    Job(
        PACK_JOB_NAME,
        f"{PACKABLE_SQL} AND EXISTS (SELECT 1 FROM pack_targets t WHERE t.dataset_id = i.dataset_id AND t.kind = 'images')"
        f" AND {DEDUP_DONE_SQL}",
        pack_job_handler,
        batch_size=1024,
        image_columns=IMAGE_COLUMNS,
        lease_s=300.0,
    )
)
