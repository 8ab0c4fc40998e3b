"""``krea2 bench data`` at tiny sizes: the loader and the store benchmarks run end to end and give
well-formed rows (no speed is asserted)."""

import argparse
import math

from krea2_train.bench import data_balance, data_loader, data_store


def _args(module, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_bench_shards_hold_the_samples_asked_for(tmp_path):
    manifest = data_loader.write_bench_shards(tmp_path, resolution=64, samples=40, image_format="png", shard_size=16)
    assert [shard.num_samples for shard in manifest.shards] == [16, 16, 8]
    assert {(shard.width, shard.height) for shard in manifest.shards} == {(64, 64)}


def test_loader_times_the_epoch_after_its_first_batch(tmp_path):
    manifest = data_loader.write_bench_shards(tmp_path, resolution=64, samples=32, image_format="png")
    samples, seconds = data_loader.time_epoch_after_first_batch(manifest, batch=8, workers=1)
    assert samples == 32 - 8 and seconds > 0


def test_loader_bench_gives_one_row_per_resolution():
    args = _args(data_loader, "--loader-resolutions", "64", "32", "--loader-samples", "16", "--loader-batch", "4", "--loader-workers", "1")
    rows = data_loader.run(args)
    assert [row["metric"] for row in rows] == ["samples_per_s_64px_1workers_png", "samples_per_s_32px_1workers_png"]
    for row in rows:
        assert row["bench"] == "data_loader" and row["unit"] == "samples/s" and row["met"] is None
        assert row["value"] > 0 and math.isfinite(row["value"])


def test_store_bench_measures_queue_and_upserts_on_a_scratch_database(pg_store_dsn):
    args = _args(
        data_store, "--dsn", pg_store_dsn, "--queue-workers", "2", "--queue-batch", "4", "--queue-rows", "400",
        "--upsert-writers", "2", "--upsert-batch", "10", "--upsert-keys", "200", "--seconds", "0.3",
    )  # fmt: skip; 400 rows: fewer than a phase claims, so each phase needs its own seeded queue
    databases_before = _databases(pg_store_dsn)
    rows = data_store.run(args)
    assert [row["metric"] for row in rows] == [
        "queue claims (2 workers, batch 4)",
        "queue claim + fenced completion (2 workers, batch 4)",
        "scoped queue claims (2 workers, batch 4; a dataset's rows behind 400 others)",
        "unnest upsert (2 writers, 10-row sorted batches)",
    ]
    for row in rows:
        assert row["bench"] == "data_store" and row["unit"] == "rows/s"
        assert row["value"] > 0 and math.isfinite(row["value"])
    targets = {metric: data_store.QUEUE_TARGET for metric in (rows[0]["metric"], rows[2]["metric"])}
    targets[rows[3]["metric"]] = data_store.UPSERT_TARGET
    for row in (rows[0], rows[2], rows[3]):
        assert row["met"] == (row["value"] >= targets[row["metric"]])
    assert rows[1]["met"] is None
    assert _databases(pg_store_dsn) == databases_before  # its scratch database is dropped


def test_balance_bench_reads_embeddings_clusters_and_sweeps_on_a_scratch_database(pg_store_dsn):
    databases_before = _databases(pg_store_dsn)
    rows = data_balance.run(_args(data_balance, "--dsn", pg_store_dsn, "--images", "300", "--dim", "16", "--concepts", "500"))
    assert [(row["metric"], row["unit"]) for row in rows] == [
        ("load_embeddings (300 x 16)", "embeddings/s"),
        ("load_embeddings peak / array size (300 x 16)", "x"),
        ("hierarchical k-means, levels 1 1, 256 training points per cluster, on cpu (300 x 16)", "embeddings/s"),
        ("semantic dedup inside 1 level-1 clusters on cpu (300 x 16)", "embeddings/s"),
        ("image_clusters write, COPY (300 rows)", "rows/s"),
        ("image_clusters read, server-side cursor (300 rows)", "rows/s"),
        ("queue seed sweep with nothing to add (300 images)", "images/s"),
        ("rare-concept priority: caption search and choice, 500 concepts (300 captions)", "captions/s"),
    ]
    assert all(row["value"] > 0 and math.isfinite(row["value"]) and row["met"] is None for row in rows)
    assert rows[1]["value"] >= 1  # the array itself is traced
    assert _databases(pg_store_dsn) == databases_before


def _databases(dsn: str) -> set[str]:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        return {name for (name,) in conn.execute("SELECT datname FROM pg_database")}
