"""Balanced-selection store benchmarks: what `krea2 data balance` and the queue's seeding cost at
a dataset's size, on a scratch database of the embedded server (or ``--dsn``), dropped afterwards.

    embeddings   ``load_embeddings`` of N random D-dim embeddings into one array: embeddings/s,
                 and its peak traced memory over the array's size (a second, traced pass)
    kmeans       ``hierarchical_kmeans`` of those embeddings, levels N/1000 and N/10000, its
                 k-means runs and nearest-centroid searches on the GPU when there is one: embeddings/s
    semantic     ``semantic_duplicates`` inside the level-1 clusters at cosine 0.95 (on the
                 GPU when there is one): embeddings/s
    clusters     ``image_clusters`` of a 3-level clustering of the N images written (COPY) and
                 read back (server-side cursor): rows/s
    sweep        a queue seed over the N images when every one has its row already (what a
                 followed job repeats): images/s
    concepts     the rare-concept priority (``--concepts`` of them, 1 to 3 words each) over N
                 captions of 24 words: caption search and choosing the images first: captions/s

No targets: the rates say how long a dataset of a given size takes (docs/recipe.md, docs/data.md).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from dataclasses import replace

import numpy as np

from krea2_train.arguments import positive_int

BENCH = "data_balance"
INSERT_CHUNK = 20_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dsn", default=None, help="server to benchmark (default: a fresh embedded server)")
    parser.add_argument("--images", type=positive_int, default=20_000, help="images (and embeddings) in the scratch dataset")
    parser.add_argument("--dim", type=positive_int, default=768, help="embedding width")
    parser.add_argument("--concepts", type=positive_int, default=100_000, help="concepts in the list searched for in the captions")
    parser.add_argument("--train-points-per-cluster", type=positive_int, default=None,
                        help="k-means training sample per cluster (default: balance's; a large value trains on every embedding)")


def _fill(store, images: int, dim: int) -> tuple[int, list[int]]:
    """A dataset of ``images`` decoded images with random unit embeddings; (dataset id, image ids)."""
    rng = np.random.default_rng(0)
    image_ids: list[int] = []
    with store.pool.connection() as conn:
        (dataset_id,) = conn.execute("INSERT INTO datasets (name) VALUES ('bench') RETURNING id").fetchone()
        for start in range(0, images, INSERT_CHUNK):
            count = min(INSERT_CHUNK, images - start)
            ids = [row[0] for row in conn.execute(
                "INSERT INTO images (dataset_id, uri, decode_ok) SELECT %s, '/bench/' || g, true"
                " FROM generate_series(%s::int, %s::int) g RETURNING id",
                (dataset_id, start, start + count - 1),
            )]
            vectors = rng.standard_normal((count, dim)).astype("<f4")
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            conn.execute(
                "INSERT INTO image_embeddings (image_id, embedder, dim, embedding)"
                " SELECT u.i, 'bench', %s, u.e FROM unnest(%s::bigint[], %s::bytea[]) AS u (i, e)",
                (dim, ids, [vector.tobytes() for vector in vectors]),
            )
            image_ids += ids
        conn.execute("VACUUM ANALYZE images")
        conn.execute("VACUUM ANALYZE image_embeddings")
    return dataset_id, sorted(image_ids)


def concept_search_s(images: int, num_concepts: int) -> float:
    """Seconds of the rare-concept priority over ``images`` random captions (24 words of a 50,000-word
    vocabulary) with a list of ``num_concepts`` random concepts of 1 to 3 words."""
    from krea2_train.curate.concepts import concept_list, match_captions, prioritised_images

    rng = np.random.default_rng(2)
    vocabulary = np.array([f"w{index}" for index in range(50_000)])
    index = {}
    while len(index) < num_concepts:
        index.setdefault(tuple(vocabulary[rng.integers(0, len(vocabulary), rng.integers(1, 4))]), len(index))
    concepts = concept_list([" ".join(key) for key in index], np.ones(len(index)), "bench")
    captions = [" ".join(vocabulary[rng.integers(0, len(vocabulary), 24)]) for _ in range(images)]
    began = time.perf_counter()
    offsets, concept_ids = match_captions(captions, concepts, total=images)
    prioritised_images(offsets, concept_ids, concepts.weights, 100, images // 4)
    return time.perf_counter() - began


def run(args) -> list[dict]:
    from psycopg.types.json import Jsonb

    from krea2_train.bench import bench_row
    from krea2_train.bench.data_store import _drop_database, _scratch_database
    from krea2_train.curate.balance import _store_hierarchy, load_embeddings, read_clusters
    from krea2_train.curate.embeddings import default_device
    from krea2_train.curate.kmeans import Hierarchy, KMeansSettings, hierarchical_kmeans, semantic_duplicates
    from krea2_train.store import open_store
    from krea2_train.store.embedded import EmbeddedServer
    from krea2_train.store.queue import Job, Queue

    n, dim = args.images, args.dim
    with tempfile.TemporaryDirectory(prefix="krea2-bench-") as scratch:
        embedded = None if args.dsn else EmbeddedServer(scratch)
        server_dsn = args.dsn or embedded.dsn
        name, dsn = _scratch_database(server_dsn)
        try:
            with open_store(dsn) as store:
                dataset_id, image_ids = _fill(store, n, dim)

                began = time.perf_counter()
                embeddings = load_embeddings(store, image_ids, "bench")
                load_s = time.perf_counter() - began
                tracemalloc.start()
                load_embeddings(store, image_ids, "bench")
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()

                device, levels = default_device(), (max(1, n // 1000), max(1, n // 10000))
                settings = KMeansSettings(levels=levels)
                if args.train_points_per_cluster is not None:
                    settings = replace(settings, train_points_per_cluster=args.train_points_per_cluster)
                began = time.perf_counter()
                clustered = hierarchical_kmeans(embeddings, settings, device)
                kmeans_s = time.perf_counter() - began
                began = time.perf_counter()
                semantic_duplicates(embeddings, clustered.point_clusters[:, 0], clustered.centroid_distances, 0.95, device)
                semantic_s = time.perf_counter() - began

                rng = np.random.default_rng(1)
                clusters = np.stack([rng.integers(0, k, n) for k in (max(1, n // 100), max(1, n // 1000), 10)], axis=1)
                hierarchy = Hierarchy(clusters, (), rng.random(n).astype(np.float32))
                with store.pool.connection() as conn, conn.transaction():
                    (clustering_id,) = conn.execute(
                        "INSERT INTO clusterings (dataset_id, embedder, images_sha256, settings, num_levels, num_images)"
                        " VALUES (%s, 'bench', 'bench', %s, 3, %s) RETURNING id",
                        (dataset_id, Jsonb({}), n),
                    ).fetchone()
                    began = time.perf_counter()
                    _store_hierarchy(conn, clustering_id, image_ids, hierarchy)
                write_s = time.perf_counter() - began
                began = time.perf_counter()
                read_clusters(store, clustering_id)
                read_s = time.perf_counter() - began

                queue = Queue(store, Job("bench_sweep", "i.decode_ok", lambda rows, ctx: [], batch_size=16))
                try:
                    queue.seed()  # every image gets its row
                    began = time.perf_counter()
                    queue.seed()  # the sweep a followed job repeats: nothing to add
                    sweep_s = time.perf_counter() - began
                finally:
                    queue.close()
        finally:
            _drop_database(server_dsn, name)
            if embedded is not None:
                embedded.stop()
    size = f"{n:,} x {dim}"
    return [
        bench_row(BENCH, f"load_embeddings ({size})", n / load_s, "embeddings/s"),
        bench_row(BENCH, f"load_embeddings peak / array size ({size})", peak / embeddings.nbytes, "x"),
        bench_row(BENCH, f"hierarchical k-means, levels {levels[0]:,} {levels[1]:,}, {settings.train_points_per_cluster:,} training"
                  f" points per cluster, on {device} ({size})", n / kmeans_s,
                  "embeddings/s"),
        bench_row(BENCH, f"semantic dedup inside {levels[0]:,} level-1 clusters on {device} ({size})", n / semantic_s, "embeddings/s"),
        bench_row(BENCH, f"image_clusters write, COPY ({n:,} rows)", n / write_s, "rows/s"),
        bench_row(BENCH, f"image_clusters read, server-side cursor ({n:,} rows)", n / read_s, "rows/s"),
        bench_row(BENCH, f"queue seed sweep with nothing to add ({n:,} images)", n / sweep_s, "images/s"),
        bench_row(BENCH, f"rare-concept priority: caption search and choice, {args.concepts:,} concepts ({n:,} captions)",
                  n / concept_search_s(n, args.concepts), "captions/s"),
    ]


if __name__ == "__main__":
    from krea2_train.bench import module_main

    raise SystemExit(module_main(__spec__.name))
