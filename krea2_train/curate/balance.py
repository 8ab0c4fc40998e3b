"""Selections: derived datasets chosen from another dataset's images, in the store.

    balance  midtraining data: embed every selectable image (``image_embeddings``), cluster them
             by hierarchical k-means (``clusterings``, cluster ids per level in
             ``image_clusters``), sample a target size top-down by water-filling; with a concept
             list, the images naming its rare concepts first (``krea2_train.curate.concepts``)
    curate   SFT data: the top N images by a filter score the ``filters`` job wrote
    filter   any stage: the images whose filter scores lie within bounds (drop extremes only)

A selection is materialised as a dataset of its own (``datasets`` + ``images`` rows with the
source rows' URIs, captions, decode and filter results, recorded in ``selections``), so pack and
the loader read it like any dataset. Every step is idempotent: stored embeddings and clusterings
are reused, and asking again for a selection that exists with the same settings returns it.
Selectable images are those pack would pack (decoded, not duplicates, with a long caption).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from psycopg import sql
from psycopg.types.json import Jsonb

from krea2_train.arguments import non_negative_int, positive_int
from krea2_train.curate.concepts import ConceptList, match_captions, prioritised_images, read_concepts
from krea2_train.curate.embeddings import Embedder, build_embedder, default_device, embedder_spec
from krea2_train.curate.images import open_rgb
from krea2_train.curate.kmeans import (
    Hierarchy,
    KMeansSettings,
    balanced_sample,
    check_similarity_threshold,
    hierarchical_kmeans,
    semantic_duplicates,
)
from krea2_train.data.pack import DEDUP_DONE_SQL, PACK_JOB_NAME, PACKABLE_SQL
from krea2_train.errors import UsageError
from krea2_train.logs import Progress
from krea2_train.store import Store, StoreError
from krea2_train.store.db import find_dataset_id
from krea2_train.store.queue import Done, Job, JobContext, Outcome, register_job, requeue_dataset

logger = logging.getLogger(__name__)

EMBED_BATCH = 64
EMBEDDING_PAGE = 20_000  # image ids whose embeddings are looked up (or read) per query
READ_THREADS = 4  # threads reading and decoding files while the embedder runs
READ_AHEAD = 2  # batches being read at once (the one embedded next included)
EMBED_JOB_NAME = "embed"
CLUSTER_ROWS_BATCH = 10_000  # rows of image_clusters written or read at a time
# images columns a selection does not copy: its own key and dataset, the source's dedup links
NOT_COPIED = ("id", "dataset_id", "duplicate_of", "ingested_at")
# filter scores and the direction in which they are better (None: both ends are bad, so curating by
# the score needs an explicit order: a low Laplacian variance is blur, a very high one noise)
CURATE_SCORES = {"rgb_entropy": "desc", "laplacian_var": None, "white_ratio": "asc", "black_ratio": "asc"}


@dataclass(frozen=True)
class SelectionReport:
    name: str
    dataset_id: int
    source: str
    method: str
    num_images: int
    created: bool  # False: the selection existed with the same settings


def selectable_images(store: Store, dataset: str) -> tuple[int, list[int], list[str]]:
    """(dataset id, image ids, URIs) of the images pack would pack and dedup has judged, by id.

    Raises:
        StoreError: some packable image has not been through dedup yet (a selection made then
            would keep duplicates), or none is selectable.
    """
    with store.pool.connection() as conn:
        source_id = find_dataset_id(conn, dataset)
        rows = conn.execute(
            f"SELECT i.id, i.uri, {DEDUP_DONE_SQL} FROM images i WHERE i.dataset_id = %s AND {PACKABLE_SQL} ORDER BY i.id",
            (source_id,),
        ).fetchall()
    undeduplicated = sum(1 for _, _, judged in rows if not judged)
    if undeduplicated:
        raise StoreError(
            f"{undeduplicated} decoded images of {dataset!r} have not been through dedup yet, so duplicates cannot be"
            " told apart: run krea2 data work --job dedup first"
        )
    if not rows:
        raise StoreError(f"dataset {dataset!r} has no selectable images (decoded, not duplicates, captioned): run the decode job")
    return source_id, [row[0] for row in rows], [row[1] for row in rows]


def ids_digest(image_ids: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, image_ids)).encode()).hexdigest()


# -- embeddings ----------------------------------------------------------------------------------


STORED_EMBEDDINGS_SQL = """
    WITH RECURSIVE wanted AS (SELECT id, dataset_id, uri FROM images WHERE id = ANY(%(ids)s)),
    chain (dataset_id) AS (
        SELECT DISTINCT dataset_id FROM wanted
        UNION SELECT s.source_dataset_id FROM selections s JOIN chain c ON s.dataset_id = c.dataset_id)
    SELECT DISTINCT ON (w.id) w.id, {column} FROM wanted w
      JOIN images o ON o.uri = w.uri AND o.dataset_id IN (SELECT dataset_id FROM chain)
      JOIN image_embeddings e ON e.image_id = o.id AND e.embedder = %(embedder)s
     ORDER BY w.id, o.id
"""


def _stored_embeddings(conn, image_ids: Sequence[int], embedder_name: str) -> dict[int, bytes]:
    """{image id: stored embedding} of those of ``image_ids`` that have one.

    An embedding belongs to a file, so an image also takes the embedding of the image with its URI
    in the dataset it was selected from (up the chain of selections): a selection's copies are never
    embedded again, and nothing is stored twice.
    """
    rows = conn.execute(
        STORED_EMBEDDINGS_SQL.format(column="e.embedding"),
        {"ids": list(image_ids), "embedder": embedder_name},
        binary=True,  # bytea as bytes on the wire: a third of the time of its hex text form
    ).fetchall()
    return dict(rows)


def _embedded(conn, image_ids: Sequence[int], embedder_name: str) -> set[int]:
    """Those of ``image_ids`` that have an embedding (as :func:`_stored_embeddings`), without reading it."""
    rows = conn.execute(STORED_EMBEDDINGS_SQL.format(column="NULL"), {"ids": list(image_ids), "embedder": embedder_name})
    return {image_id for image_id, _ in rows}


def embed_images(
    store: Store, image_ids: list[int], uris: list[str], embedder: Embedder, batch_size: int = EMBED_BATCH,
    before_batch: Callable[[], None] = lambda: None,
) -> int:
    """Compute and store the embeddings that are missing (see :func:`_stored_embeddings`); returns
    how many were computed. Files are read by ``READ_THREADS`` threads while the embedder runs;
    ``before_batch()`` runs before each batch is embedded (the embed job's lease check)."""
    todo = []
    for start in range(0, len(image_ids), EMBEDDING_PAGE):
        page = image_ids[start : start + EMBEDDING_PAGE]
        with store.pool.connection() as conn:
            done = _embedded(conn, page, embedder.name)
        todo += [(i, uri) for i, uri in zip(page, uris[start : start + EMBEDDING_PAGE]) if i not in done]
    progress = Progress(f"embedded with {embedder.name}:", len(todo), "images", logger)
    readers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="krea2-embed-read")
    reading: deque[list[Future]] = deque()
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            for ahead in range(start + len(reading) * batch_size, min(start + READ_AHEAD * batch_size, len(todo)), batch_size):
                reading.append([readers.submit(_open_decoded, uri) for _, uri in todo[ahead : ahead + batch_size]])
            before_batch()
            vectors = embedder.embed([future.result() for future in reading.popleft()])
            broken = [uri for (_, uri), vector in zip(batch, vectors) if not np.isfinite(vector).all()]
            if broken:  # stored, it would fail every clustering of the dataset
                raise StoreError(
                    f"embedder {embedder.name!r} gave non-finite values for {len(broken)} image(s), not stored: "
                    + ", ".join(broken[:5])
                )
            with store.pool.connection() as conn:
                conn.execute(
                    "INSERT INTO image_embeddings (image_id, embedder, dim, embedding)"
                    " SELECT u.image_id, %s, %s, u.embedding FROM unnest(%s::bigint[], %s::bytea[]) AS u (image_id, embedding)"
                    " ON CONFLICT DO NOTHING",
                    (embedder.name, embedder.dim, [i for i, _ in batch], [v.astype("<f4").tobytes() for v in vectors]),
                )
            progress.update(start + len(batch))
    finally:  # after an error, the reads not yet begun are dropped
        readers.shutdown(cancel_futures=True)
    return len(todo)


def _open_decoded(uri: str):
    """An image the decode job accepted, read again; an error names the file (the embeddings of
    earlier batches are stored, so a rerun after fixing or removing it goes on from there)."""
    try:
        return open_rgb(uri)
    except Exception as error:
        raise ValueError(f"{uri} was decoded but cannot be read now: {type(error).__name__}: {error}") from error


def load_embeddings(store: Store, image_ids: list[int], embedder_name: str) -> np.ndarray:
    """[n, dim] float32 embeddings of ``image_ids``, in that order; a missing one is an error.

    Read ``EMBEDDING_PAGE`` at a time into one array: the peak is about the array's size."""
    embeddings = None
    for start in range(0, len(image_ids), EMBEDDING_PAGE):
        page = image_ids[start : start + EMBEDDING_PAGE]
        with store.pool.connection() as conn:
            stored = _stored_embeddings(conn, page, embedder_name)
        missing = [i for i in page if i not in stored]
        if missing:
            raise StoreError(
                f"{len(missing)} images have no {embedder_name!r} embedding (first: image id {missing[0]}):"
                " run krea2 data work --job embed, or balance, which embeds what is missing"
            )
        if embeddings is None:
            dim = len(stored[page[0]]) // 4
            embeddings = np.empty((len(image_ids), dim), dtype=np.float32)
        blobs = [stored[image_id] for image_id in page]
        odd = next((i for i, blob in zip(page, blobs) if len(blob) != 4 * embeddings.shape[1]), None)
        if odd is not None:
            raise StoreError(
                f"image id {odd} has a {embedder_name!r} embedding of {len(stored[odd]) // 4} values, others {embeddings.shape[1]}"
            )
        embeddings[start : start + len(page)] = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(page), -1)
    if embeddings is None:
        raise StoreError("no images to load embeddings of")
    return embeddings


# -- the embed job -------------------------------------------------------------------------------


def add_embed_target(store: Store, dataset: str, embedder: str) -> int:
    """Have the ``embed`` job embed the selectable images of ``dataset`` with ``embedder`` (a
    spec: ``"small"`` or a model directory every worker node can read); returns the dataset id.

    A new target sends the images the job has finished, or is embedding now, back to pending
    (an image with this embedding already is skipped when its row runs again). The target is
    committed before the rows go back, so a batch claimed in between reads it."""
    spec = embedder_spec(embedder)
    with store.pool.connection() as conn:  # autocommit: each statement commits on its own
        dataset_id = find_dataset_id(conn, dataset)
        (requeue_pending,) = conn.execute(
            "INSERT INTO embed_targets (dataset_id, embedder, requeue_pending) VALUES (%s, %s, true)"
            " ON CONFLICT (dataset_id, embedder) DO UPDATE"  # one being removed comes back as new
            " SET requeue_pending = embed_targets.requeue_pending OR embed_targets.removing, removing = false"
            " RETURNING requeue_pending", (dataset_id, spec)
        ).fetchone()
        if requeue_pending:  # new, or a requeue cut short: send the rows back (again)
            requeue_dataset(conn, EMBED_JOB_NAME, dataset_id, states=("done", "running"))
            conn.execute("UPDATE embed_targets SET requeue_pending = false WHERE dataset_id = %s AND embedder = %s", (dataset_id, spec))
    return dataset_id


def remove_embed_target(store: Store, dataset: str, embedder: str) -> bool:
    """Stop embedding ``dataset`` with ``embedder`` (e.g. a model the workers cannot load); the
    job's rows of the dataset it had set aside as dead go back to pending, to be embedded with the
    targets that remain. Returns whether the target existed.

    The target is marked ``removing`` (the job stops using it) before the rows go back, and
    deleted after: a removal cut short is finished by running it again."""
    spec = embedder_spec(embedder, must_exist=False)  # the directory may be gone
    with store.pool.connection() as conn:  # autocommit: each statement commits on its own
        dataset_id = find_dataset_id(conn, dataset)
        found = conn.execute(
            "UPDATE embed_targets SET removing = true WHERE dataset_id = %s AND embedder = %s", (dataset_id, spec)
        ).rowcount
        if found:
            requeue_dataset(conn, EMBED_JOB_NAME, dataset_id, states=("dead",))
            conn.execute("DELETE FROM embed_targets WHERE dataset_id = %s AND embedder = %s AND removing", (dataset_id, spec))
    return bool(found)


_WORKER_EMBEDDERS: dict[str, Embedder] = {}


def _worker_embedder(spec: str) -> Embedder:
    """The embedder of ``spec``, loaded once per worker process (on its GPU when it has one)."""
    if spec not in _WORKER_EMBEDDERS:
        _WORKER_EMBEDDERS[spec] = build_embedder(spec)
    return _WORKER_EMBEDDERS[spec]


def embed_job_handler(rows: list[dict], ctx: JobContext) -> list[Outcome]:
    """The ``embed`` job: embed a claimed batch with every embed target of its datasets."""
    with ctx.store.pool.connection() as conn:
        targets = conn.execute(
            "SELECT dataset_id, embedder FROM embed_targets WHERE dataset_id = ANY(%s) AND NOT removing"
            " ORDER BY embedder, dataset_id",
            (sorted({row["dataset_id"] for row in rows}),),
        ).fetchall()
    for dataset_id, spec in targets:
        batch = [row for row in rows if row["dataset_id"] == dataset_id]
        embed_images(ctx.store, [row["id"] for row in batch], [row["uri"] for row in batch], _worker_embedder(spec),
                     before_batch=ctx.check_lease)
    return [Done({}) for _ in rows]


EMBED_JOB = register_job(
    Job(
        EMBED_JOB_NAME,
        f"{PACKABLE_SQL} AND {DEDUP_DONE_SQL} AND EXISTS (SELECT 1 FROM embed_targets t WHERE t.dataset_id = i.dataset_id AND NOT t.removing)",
        embed_job_handler,
        batch_size=256,
        lease_s=300.0,
        uses_gpu=True,
    )
)


# -- clusterings ---------------------------------------------------------------------------------


def _store_hierarchy(conn, clustering_id: int, image_ids: list[int], hierarchy: Hierarchy) -> None:
    with conn.cursor() as cursor, cursor.copy(
        "COPY image_clusters (clustering_id, image_id, cluster_ids, centroid_distance) FROM STDIN"
    ) as copy:
        for start in range(0, len(image_ids), CLUSTER_ROWS_BATCH):  # Python objects for one batch at a time
            end = start + CLUSTER_ROWS_BATCH
            rows = zip(image_ids[start:end], hierarchy.point_clusters[start:end].tolist(),
                       hierarchy.centroid_distances[start:end].tolist())
            for image_id, cluster_ids, distance in rows:
                copy.write_row((clustering_id, image_id, cluster_ids, distance))
    for level, centroids in enumerate(hierarchy.centroids):
        sizes = np.bincount(hierarchy.point_clusters[:, level], minlength=len(centroids))
        with conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO cluster_centroids (clustering_id, level, cluster_id, num_images, centroid) VALUES (%s, %s, %s, %s, %s)",
                [(clustering_id, level + 1, c, int(sizes[c]), centroids[c].astype("<f4").tobytes()) for c in range(len(centroids))],
            )


def cluster_images(
    store: Store, dataset_id: int, image_ids: list[int], embedder_name: str, settings: KMeansSettings,
    embeddings: np.ndarray | None = None,
) -> int:
    """The id of the clustering of ``image_ids`` with these settings, computing it once (the
    nearest-centroid searches on the GPU when there is one) from ``embeddings`` [n, d] in
    ``image_ids``' order, read from the store when not given."""
    key = (dataset_id, embedder_name, ids_digest(image_ids), Jsonb(settings.to_json()))
    find = "SELECT id FROM clusterings WHERE dataset_id = %s AND embedder = %s AND images_sha256 = %s AND settings = %s"
    with store.pool.connection() as conn:
        row = conn.execute(find, key).fetchone()
    if row is not None:
        return row[0]
    if embeddings is None:
        embeddings = load_embeddings(store, image_ids, embedder_name)
    hierarchy = hierarchical_kmeans(embeddings, settings, default_device())
    with store.pool.connection() as conn, conn.transaction():
        row = conn.execute(
            "INSERT INTO clusterings (dataset_id, embedder, images_sha256, settings, num_levels, num_images)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING id",
            (*key, hierarchy.num_levels, len(image_ids)),
        ).fetchone()
        if row is None:  # another process stored the same clustering meanwhile
            return conn.execute(find, key).fetchone()[0]
        _store_hierarchy(conn, row[0], image_ids, hierarchy)
    return row[0]


def read_clusters(store: Store, clustering_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image ids [n], cluster ids [n, L] with column 0 = level 1, centroid distances [n]), by id.

    Read through a server-side cursor ``CLUSTER_ROWS_BATCH`` rows at a time into arrays."""
    with store.pool.connection() as conn, conn.transaction():
        num_images, num_levels = conn.execute(
            "SELECT num_images, num_levels FROM clusterings WHERE id = %s", (clustering_id,)
        ).fetchone() or (0, 0)
        image_ids = np.empty(num_images, dtype=np.int64)
        point_clusters = np.empty((num_images, num_levels), dtype=np.int64)
        distances = np.empty(num_images, dtype=np.float32)
        read = 0
        conn.execute("SET LOCAL cursor_tuple_fraction = 1")  # the whole result is read: plan for that, not for its first rows
        with conn.cursor(name=f"krea2_clusters_{clustering_id}") as cursor:
            cursor.itersize = CLUSTER_ROWS_BATCH
            cursor.execute(
                "SELECT image_id, cluster_ids, centroid_distance FROM image_clusters WHERE clustering_id = %s ORDER BY image_id",
                (clustering_id,),
            )
            while rows := cursor.fetchmany(CLUSTER_ROWS_BATCH):
                if read + len(rows) > num_images:
                    raise StoreError(f"clustering {clustering_id} has more image rows than the {num_images} it records")
                ids, clusters, point_distances = zip(*rows)
                image_ids[read : read + len(rows)] = ids
                point_clusters[read : read + len(rows)] = clusters
                distances[read : read + len(rows)] = point_distances
                read += len(rows)
    if read == 0:
        raise StoreError(f"clustering {clustering_id} has no images")
    if read != num_images:
        raise StoreError(f"clustering {clustering_id} records {num_images} images but has {read} image rows")
    return image_ids, point_clusters, distances


# -- selections ----------------------------------------------------------------------------------


def _copied_columns(conn) -> list[str]:
    rows = conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema()"
        " AND table_name = 'images' AND is_generated = 'NEVER' ORDER BY ordinal_position"
    ).fetchall()
    return [name for (name,) in rows if name not in NOT_COPIED]


def existing_selection(store: Store, name: str, source: str, method: str, settings: dict) -> SelectionReport | None:
    """The selection ``name`` if it exists with these settings; None if there is no dataset
    ``name``; an error naming the difference otherwise."""
    with store.pool.connection() as conn:
        row = conn.execute(
            "SELECT d.id, s.method, s.settings, src.name, s.num_images FROM datasets d"
            " LEFT JOIN selections s ON s.dataset_id = d.id LEFT JOIN datasets src ON src.id = s.source_dataset_id"
            " WHERE d.name = %s",
            (name,),
        ).fetchone()
    if row is None:
        return None
    dataset_id, stored_method, stored_settings, stored_source, num_images = row
    if stored_method is None:
        raise StoreError(f"dataset {name!r} exists and is not a selection: choose another name")
    if (stored_method, stored_settings, stored_source) != (method, settings, source):
        raise StoreError(
            f"selection {name!r} exists with other settings ({stored_method} of {stored_source!r}: {stored_settings});"
            f" asked for {method} of {source!r}: {settings}. Choose another name."
        )
    return SelectionReport(name, dataset_id, source, method, num_images, created=False)


def materialise_selection(
    store: Store, source: str, name: str, image_ids: list[int], method: str, settings: dict, clustering_id: int | None = None
) -> SelectionReport:
    """Create dataset ``name`` holding copies of the source rows ``image_ids`` (same URIs,
    captions, decode and filter results; no dedup links), in one transaction.

    The copies carry the source's results, so the jobs that made them (every finished job but
    ``pack``: a selection has shards of its own) are recorded as done for them too; otherwise
    every later run of decode, dedup and filters would read each selected file again. Two
    processes deriving the same selection at once get the same one.
    """
    if not name or not name.strip():
        raise StoreError("selection name must not be empty")
    found = existing_selection(store, name, source, method, settings)
    if found is not None:
        return found
    with store.pool.connection() as conn, conn.transaction():
        source_id = find_dataset_id(conn, source)
        row = conn.execute(
            "INSERT INTO datasets (name, source) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING RETURNING id",
            (name, f"selection:{method}:{source}"),
        ).fetchone()
        if row is not None:
            inserted = _copy_into_selection(conn, source, source_id, row[0], image_ids)
            conn.execute(
                "INSERT INTO selections (dataset_id, source_dataset_id, method, settings, clustering_id, num_images)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (row[0], source_id, method, Jsonb(settings), clustering_id, inserted),
            )
    if row is None:  # another process made it meanwhile (the insert waited for its commit)
        return existing_selection(store, name, source, method, settings)
    return SelectionReport(name, row[0], source, method, inserted, created=True)


def _copy_into_selection(conn, source: str, source_id: int, dataset_id: int, image_ids: list[int]) -> int:
    """Copy the source rows ``image_ids`` into dataset ``dataset_id``, with their finished job rows
    (``pack``'s excepted); returns the images copied."""
    columns = ", ".join(_copied_columns(conn))
    inserted = conn.execute(
        f"INSERT INTO images (dataset_id, {columns}) SELECT %s, {columns} FROM images"
        " WHERE dataset_id = %s AND id = ANY(%s) ORDER BY id",
        (dataset_id, source_id, sorted(image_ids)),
    ).rowcount
    if inserted != len(set(image_ids)):
        raise StoreError(f"{len(set(image_ids)) - inserted} selected image ids are not in dataset {source!r}")
    conn.execute(
        "INSERT INTO job_runs (job, image_id, state, attempt, result)"
        " SELECT j.job, copy.id, 'done', j.attempt, j.result FROM images copy"
        " JOIN images original ON original.dataset_id = %s AND original.uri = copy.uri"
        " JOIN job_runs j ON j.image_id = original.id AND j.state = 'done' AND j.job <> %s"
        " WHERE copy.dataset_id = %s",
        (source_id, PACK_JOB_NAME, dataset_id),
    )
    return inserted


def balance_dataset(
    store: Store,
    dataset: str,
    name: str,
    target: int,
    settings: KMeansSettings,
    embedder: Embedder | str = "small",
    leaf_pick: str = "random",
    semantic_dedup: float | None = None,
    fraction: float | None = None,
    concepts: ConceptList | None = None,
    images_per_concept: int = 100,
    concept_share: float = 0.25,
) -> SelectionReport:
    """Select ``target`` images of ``dataset`` balanced over its hierarchical k-means clusters,
    as the dataset ``name``.

    With ``semantic_dedup`` (a cosine similarity), the near-duplicates inside each level-1 cluster
    are left out first (:func:`~krea2_train.curate.kmeans.semantic_duplicates`). A ``target`` of 0
    takes ``fraction`` of the images that remain. With ``concepts``, up to ``concept_share`` of the
    target goes first to the images whose captions name the list's rare concepts, up to
    ``images_per_concept`` a concept (:mod:`krea2_train.curate.concepts`); the balanced sample
    chooses the rest among the others."""
    if concepts is not None and not (images_per_concept >= 1 and 0 <= concept_share <= 1):
        raise StoreError(f"images_per_concept must be >= 1 and concept_share in [0, 1], got {images_per_concept} and {concept_share}")
    dataset_id, image_ids, uris = selectable_images(store, dataset)
    if target == 0 and fraction is not None:
        if not 0 < fraction <= 1:
            raise StoreError(f"fraction must be in (0, 1], got {fraction}")
    elif not 0 < target <= len(image_ids):
        raise StoreError(f"target must be in 1..{len(image_ids)} (the selectable images of {dataset!r}), got {target}")
    if semantic_dedup is not None:
        try:
            check_similarity_threshold(semantic_dedup)  # before any embedding or clustering
        except ValueError as error:
            raise StoreError(str(error)) from None
    embedder = build_embedder(embedder) if isinstance(embedder, str) else embedder
    selection_settings = {
        "target": target, "embedder": embedder.name, "leaf_pick": leaf_pick,
        "images_sha256": ids_digest(image_ids), **settings.to_json(), "semantic_dedup": semantic_dedup,
    }
    if target == 0:
        selection_settings["fraction"] = fraction
    if concepts is not None:
        selection_settings |= {"concepts_sha256": concepts.sha256, "images_per_concept": images_per_concept, "concept_share": concept_share}
    found = existing_selection(store, name, dataset, "balance", selection_settings)
    if found is not None:
        return found
    embed_images(store, image_ids, uris, embedder)
    embeddings = load_embeddings(store, image_ids, embedder.name) if semantic_dedup is not None else None
    clustering_id = cluster_images(store, dataset_id, image_ids, embedder.name, settings, embeddings)
    clustered_ids, point_clusters, distances = read_clusters(store, clustering_id)
    kept = np.arange(len(clustered_ids))
    if semantic_dedup is not None:
        if not np.array_equal(clustered_ids, image_ids):  # the embeddings are in image_ids' order
            raise StoreError(f"clustering {clustering_id} does not hold the images of {dataset!r} in id order")
        duplicate = semantic_duplicates(embeddings, point_clusters[:, 0], distances, semantic_dedup, default_device())
        del embeddings
        kept = np.flatnonzero(~duplicate)
        logger.info(
            "semantic dedup of %s at cosine similarity >= %g inside level-1 clusters: %d of %d images left out",
            dataset, semantic_dedup, len(clustered_ids) - len(kept), len(clustered_ids),
        )
    if target == 0:
        target = max(1, round(fraction * len(kept)))
    if target > len(kept):
        raise StoreError(
            f"target {target} is more than the {len(kept)} images of {dataset!r} left after semantic dedup at"
            f" {semantic_dedup} ({len(clustered_ids) - len(kept)} near-duplicates): lower the target or raise the threshold"
        )
    first = np.empty(0, dtype=np.int64)
    if concepts is not None:
        if not np.array_equal(clustered_ids, image_ids):  # the captions are read in id order
            raise StoreError(f"clustering {clustering_id} does not hold the images of {dataset!r} in id order")
        first = kept[concept_priority(store, dataset, image_ids, kept, concepts, images_per_concept,
                                      math.floor(concept_share * target), settings.seed)]  # fmt: skip
    rest = np.setdiff1d(kept, first, assume_unique=True)
    chosen = first
    if target > len(first):
        chosen = np.sort(np.concatenate([first, rest[balanced_sample(
            point_clusters[rest], target - len(first), seed=settings.seed, leaf_pick=leaf_pick, centroid_distances=distances[rest]
        )]]))
    return materialise_selection(
        store, dataset, name, clustered_ids[chosen].tolist(), "balance", selection_settings, clustering_id
    )


def concept_priority(
    store: Store, dataset: str, image_ids: list[int], kept: np.ndarray, concepts: ConceptList, images_per_concept: int,
    budget: int, seed: int,
) -> np.ndarray:
    """Indices into ``kept`` (sorted positions in ``image_ids``) of the images chosen first for
    their rare concepts (:func:`~krea2_train.curate.concepts.prioritised_images`). The captions of
    those images are read EMBEDDING_PAGE at a time, by id."""

    def kept_captions():
        for start in range(0, len(kept), EMBEDDING_PAGE):
            ids = [image_ids[position] for position in kept[start : start + EMBEDDING_PAGE]]
            with store.pool.connection() as conn:
                captions = dict(conn.execute("SELECT id, caption_long FROM images WHERE id = ANY(%s)", (ids,)).fetchall())
            yield from (captions.get(image_id) for image_id in ids)

    offsets, concept_ids = match_captions(kept_captions(), concepts, total=len(kept))
    priority = prioritised_images(offsets, concept_ids, concepts.weights, images_per_concept, budget, seed)
    logger.info(
        "concepts of %s: %d of the list's %d are named in captions; %d images chosen first for %d of them (%d rare ones"
        " with all their images), of a budget of %d", dataset, priority.concepts_found, len(concepts), len(priority.picked),
        priority.concepts_served, priority.concepts_whole, budget,
    )
    return priority.picked


def _is_score(value) -> bool:
    """A score to rank or bound by: not missing, not NaN (NaN would pass every bound and break the sort)."""
    return value is not None and not math.isnan(value)


def _check_score_column(conn, by: str, option: str = "--by") -> None:
    row = conn.execute(
        "SELECT data_type FROM information_schema.columns WHERE table_schema = current_schema()"
        " AND table_name = 'images' AND column_name = %s",
        (by,),
    ).fetchone()
    if row is None or row[0] not in ("real", "double precision", "integer", "bigint", "smallint", "numeric"):
        raise StoreError(f"{option} {by!r} is not a numeric column of images; known scores: {sorted(CURATE_SCORES)}")


def curate_dataset(store: Store, dataset: str, name: str, top: int, by: str, order: str | None = None) -> SelectionReport:
    """Select the ``top`` images of ``dataset`` by the score column ``by`` (best first: ``order``
    "desc" or "asc", by default the known direction of the score, else "desc"; ties by id), as
    the dataset ``name``. Every selectable image must have the score."""
    order = order or CURATE_SCORES.get(by, "desc")
    if order is None:
        raise StoreError(f"{by} has no better direction (both ends are bad: low is blur, high is noise); give the order (asc or desc)")
    if order not in ("asc", "desc"):
        raise StoreError(f"order must be 'asc' or 'desc', got {order!r}")
    dataset_id, image_ids, _ = selectable_images(store, dataset)
    if not 0 < top <= len(image_ids):
        raise StoreError(f"top must be in 1..{len(image_ids)} (the selectable images of {dataset!r}), got {top}")
    with store.pool.connection() as conn:
        _check_score_column(conn, by)
        query = sql.SQL("SELECT id, {} FROM images WHERE id = ANY(%s)").format(sql.Identifier(by))
        scores = dict(conn.execute(query, (image_ids,)).fetchall())
    unscored = [i for i in image_ids if not _is_score(scores[i])]
    if unscored:
        raise StoreError(
            f"{len(unscored)} images of {dataset!r} have no {by} or a NaN one (first: image id {unscored[0]}):"
            " run its job first (krea2 data work --job filters), or fix the job that gave NaN"
        )
    sign = -1.0 if order == "desc" else 1.0
    chosen = sorted(image_ids, key=lambda i: (sign * scores[i], i))[:top]
    settings = {"top": top, "by": by, "order": order, "images_sha256": ids_digest(image_ids)}
    return materialise_selection(store, dataset, name, chosen, "curate", settings)


def filter_dataset(
    store: Store, dataset: str, name: str, minimum: Mapping[str, float], maximum: Mapping[str, float]
) -> SelectionReport:
    """Keep the images of ``dataset`` whose score columns lie within the bounds (``minimum`` and
    ``maximum``: column -> lowest / highest kept value, inclusive), as the dataset ``name``: the
    recipe's "drop only extremely poor images". Every selectable image must have the scores."""
    columns = sorted({*minimum, *maximum})
    if not columns:
        raise StoreError("a quality filter needs at least one bound (minimum or maximum of a score)")
    for column in set(minimum) & set(maximum):
        if minimum[column] > maximum[column]:
            raise StoreError(f"the bounds of {column} are empty: minimum {minimum[column]} > maximum {maximum[column]}")
    dataset_id, image_ids, _ = selectable_images(store, dataset)
    with store.pool.connection() as conn:
        for column in columns:
            _check_score_column(conn, column, "--min/--max")
        query = sql.SQL("SELECT id, {} FROM images WHERE id = ANY(%s)").format(sql.SQL(", ").join(map(sql.Identifier, columns)))
        scores = {row[0]: dict(zip(columns, row[1:])) for row in conn.execute(query, (image_ids,))}
    unscored = [i for i in image_ids if not all(map(_is_score, scores[i].values()))]
    if unscored:
        raise StoreError(
            f"{len(unscored)} images of {dataset!r} lack a score of {columns} or have a NaN one (first: image id"
            f" {unscored[0]}): run its job first (krea2 data work --job filters), or fix the job that gave NaN"
        )
    dropped = {column: 0 for column in columns}
    chosen = []
    for image_id in image_ids:
        failing = [c for c in columns if scores[image_id][c] < minimum.get(c, -math.inf) or scores[image_id][c] > maximum.get(c, math.inf)]
        for column in failing:
            dropped[column] += 1
        if not failing:
            chosen.append(image_id)
    if not chosen:
        raise StoreError(f"no image of {dataset!r} passes the quality filter (images outside each bound: {dropped})")
    logger.info("quality filter of %s: %d of %d images kept; outside each bound: %s", dataset, len(chosen), len(image_ids), dropped)
    settings = {"minimum": dict(minimum), "maximum": dict(maximum), "images_sha256": ids_digest(image_ids)}
    return materialise_selection(store, dataset, name, chosen, "filter", settings)


def selection_name(source: str, method: str, settings: dict) -> str:
    """A stable name for the selection of ``source`` by ``method`` with ``settings``."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return f"{source}__{method}_{digest}"


# -- `krea2 data balance | curate` ---------------------------------------------------------------


def add_selection_commands(commands, store_arguments: Callable, open_store: Callable) -> None:
    """Add ``balance``, ``curate`` and ``filter`` to the ``krea2 data`` subcommands."""
    balance = commands.add_parser("balance", help="balanced selection by hierarchical k-means (midtraining data)")
    store_arguments(balance)
    balance.add_argument("--dataset", required=True, help="source dataset")
    balance.add_argument("--target", type=positive_int, required=True, help="images in the selection")
    balance.add_argument("--levels", type=positive_int, nargs="+", default=[64, 8], help="clusters per level, bottom-up (default 64 8)")
    balance.add_argument("--name", required=True, help="name of the selection (a new dataset)")
    balance.add_argument("--resample-steps", type=non_negative_int, default=3)
    balance.add_argument("--points-per-cluster", type=positive_int, default=8)
    balance.add_argument("--niter", type=positive_int, default=20, help="k-means iterations per run")
    balance.add_argument("--train-points-per-cluster", type=positive_int, default=256,
                         help="a level's first k-means run (k clusters) trains on at most k times this many random items (default 256)")
    balance.add_argument("--seed", type=int, default=0)
    balance.add_argument("--embedder", default="small", help="'small' or a local SigLIP, SigLIP 2, DINOv2 or DINOv3 transformers directory (on the GPU when there is one)")
    balance.add_argument("--leaf-pick", choices=("random", "nearest"), default="random")
    balance.add_argument("--semantic-dedup", type=float, default=None, metavar="SIMILARITY",
                         help="leave out near-duplicates inside each level-1 cluster (SemDeDup): images whose cosine"
                              " similarity to a less typical one of the cluster is at least this (e.g. 0.95; default: off)")
    balance.add_argument("--concepts", type=Path, default=None, metavar="FILE",
                         help="a concept list (one a line, optional TAB weight such as a PageRank): images whose captions name"
                              " its rare concepts are selected first (default: off)")
    balance.add_argument("--images-per-concept", type=positive_int, default=100, help="with --concepts: the most images a concept is given (default 100)")
    balance.add_argument("--concept-share", type=float, default=0.25,
                         help="with --concepts: the most of the target chosen for concepts (default 0.25)")
    balance.set_defaults(func=lambda args: _cmd_balance(args, open_store))

    curate = commands.add_parser("curate", help="the top N images by a filter score (SFT data)")
    store_arguments(curate)
    curate.add_argument("--dataset", required=True, help="source dataset")
    curate.add_argument("--top", type=positive_int, required=True, help="images in the selection")
    curate.add_argument("--by", required=True, help=f"score column of images, e.g. {', '.join(CURATE_SCORES)}")
    curate.add_argument("--order", choices=("asc", "desc"), default=None, help="best first (default: the score's own)")
    curate.add_argument("--name", required=True, help="name of the selection (a new dataset)")
    curate.set_defaults(func=lambda args: _cmd_curate(args, open_store))

    quality = commands.add_parser("filter", help="drop extreme images: keep those whose scores lie within bounds")
    store_arguments(quality)
    quality.add_argument("--dataset", required=True, help="source dataset")
    quality.add_argument("--min", action="append", default=[], metavar="SCORE=VALUE",
                         help=f"lowest kept value of a score column (repeatable), e.g. rgb_entropy=1.0; scores: {', '.join(CURATE_SCORES)}")
    quality.add_argument("--max", action="append", default=[], metavar="SCORE=VALUE", help="highest kept value, e.g. white_ratio=0.95")
    quality.add_argument("--name", required=True, help="name of the selection (a new dataset)")
    quality.set_defaults(func=lambda args: _cmd_filter(args, open_store))


def _print(report: SelectionReport) -> int:
    state = "created" if report.created else "exists (same settings)"
    print(f"selection {report.name} (dataset id {report.dataset_id}): {report.num_images} images, {report.method} of {report.source}, {state}")
    return 0


def _cmd_balance(args, open_store: Callable) -> int:
    try:
        settings = KMeansSettings(
            tuple(args.levels), args.resample_steps, args.points_per_cluster, args.niter, args.seed, args.train_points_per_cluster
        )
        concepts = None if args.concepts is None else read_concepts(args.concepts)  # ConceptListError is a ValueError
    except ValueError as error:
        raise UsageError(str(error)) from None
    with open_store(args) as store:
        return _print(balance_dataset(
            store, args.dataset, args.name, args.target, settings, args.embedder, args.leaf_pick, args.semantic_dedup,
            concepts=concepts, images_per_concept=args.images_per_concept, concept_share=args.concept_share,
        ))


def _cmd_curate(args, open_store: Callable) -> int:
    with open_store(args) as store:
        return _print(curate_dataset(store, args.dataset, args.name, args.top, args.by, args.order))


def _score_bounds(items: list[str], flag: str) -> dict[str, float]:
    bounds = {}
    for item in items:
        column, _, value = item.partition("=")
        try:
            bounds[column] = float(value)
        except ValueError:
            raise UsageError(f"{flag} {item!r} is not SCORE=VALUE") from None
    return bounds


def _cmd_filter(args, open_store: Callable) -> int:
    minimum, maximum = _score_bounds(args.min, "--min"), _score_bounds(args.max, "--max")
    with open_store(args) as store:
        return _print(filter_dataset(store, args.dataset, args.name, minimum, maximum))
