"""Selections in the store (krea2_train.curate.balance): embeddings, cluster ids per level, balanced
and curated derived datasets, `krea2 data balance | curate`, the midtrain/SFT data wiring, and
`krea2 merge` over SFT runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from krea2_train.cli import main as krea2
from krea2_train.curate.balance import (
    balance_dataset,
    curate_dataset,
    embed_images,
    filter_dataset,
    load_embeddings,
    read_clusters,
    selectable_images,
)
from krea2_train.curate.embeddings import SmallEmbedder, build_embedder, l2_normalise
from krea2_train.curate.jobs import load_jobs
from krea2_train.curate.kmeans import KMeansSettings, hierarchical_kmeans, semantic_duplicates
from krea2_train.data.ingest import ingest
from krea2_train.errors import MissingPathError
from krea2_train.data.pack import PackSettings, pack_dataset
from krea2_train.store import StoreError
from krea2_train.store.queue import get_job, run_worker

from helpers import krea2_error

# a long-tailed pool of flat-colour images: many reds, a few of everything else
COLOURS = {"red": ((220, 30, 30), 24), "green": ((30, 200, 40), 6), "blue": ((30, 40, 220), 4), "yellow": ((230, 220, 40), 2), "white": ((250, 250, 250), 2)}
SETTINGS = KMeansSettings(levels=(6, 3), resample_steps=2, points_per_cluster=3, seed=0)


def write_pool(folder: Path) -> dict[str, str]:
    """PNG + caption per image, each slightly different (noise); returns uri -> colour name."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    colours = {}
    for name, (rgb, count) in COLOURS.items():
        for index in range(count):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 12, size=(24, 24, 3)), 0, 255).astype(np.uint8)
            pixels[: 2 + index % 5] = rng.integers(0, 255, size=3)  # a band of another colour, some texture
            path = folder / f"{name}_{index:02d}.png"
            Image.fromarray(pixels).save(path)
            path.with_suffix(".txt").write_text(f"a {name} square number {index}")
            colours[str(path.resolve())] = name
    return colours


@pytest.fixture
def pool(fresh_store, tmp_path):
    colours = write_pool(tmp_path / "pool")
    ingest(fresh_store, "pool", folder=tmp_path / "pool")
    load_jobs()
    run_worker(fresh_store, get_job("decode"))
    run_worker(fresh_store, get_job("dedup"))
    return fresh_store, colours


def selection_rows(store, name):
    with store.pool.connection() as conn:
        return conn.execute(
            "SELECT i.uri, i.caption_long, i.decode_ok, i.width FROM images i JOIN datasets d ON d.id = i.dataset_id"
            " WHERE d.name = %s ORDER BY i.id",
            (name,),
        ).fetchall()


def test_small_embedder_is_deterministic_unit_norm_and_colour_aware():
    embedder = SmallEmbedder()
    red, dark_red, blue = (Image.new("RGB", (32, 32), rgb) for rgb in ((230, 20, 20), (200, 30, 30), (20, 20, 230)))
    vectors = embedder.embed([red, dark_red, blue])
    assert vectors.shape == (3, embedder.dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(vectors, embedder.embed([red, dark_red, blue]))
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
    assert build_embedder("small").name == embedder.name
    with pytest.raises(MissingPathError, match="neither"):  # a user error: one line, no traceback
        build_embedder("/no/such/model")


def test_a_directory_holding_another_kind_of_model_is_a_user_error(tmp_path):
    from transformers import BertConfig

    from krea2_train.errors import UsageError

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path / "bert")
    with pytest.raises(UsageError, match=r"holds a 'bert' model; supported embedders: \['dinov2'"):
        build_embedder(str(tmp_path / "bert"))


def test_transformers_embedders_return_the_pooled_image_embedding(tmp_path):
    import transformers

    tiny = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14)
    dino = tmp_path / "dino"
    transformers.Dinov2Model(transformers.Dinov2Config(**tiny)).save_pretrained(dino)
    transformers.BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(dino)
    siglip = tmp_path / "siglip"
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=tiny)).save_pretrained(siglip)
    transformers.SiglipImageProcessor(size={"height": 28, "width": 28}).save_pretrained(siglip)
    images = [Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("RGB", (30, 40), (0, 0, 255))]

    for folder, reference in ((dino, lambda m, p: m(**p).pooler_output), (siglip, lambda m, p: m.get_image_features(**p))):
        embedder = build_embedder(str(folder))
        model = transformers.AutoModel.from_pretrained(folder)
        inputs = transformers.AutoImageProcessor.from_pretrained(folder)(images=images, return_tensors="pt")
        with torch.no_grad():
            expected = reference(model, inputs)
        expected = getattr(expected, "pooler_output", expected)
        np.testing.assert_allclose(embedder.embed(images), l2_normalise(expected.numpy()), atol=1e-5)
        assert embedder.dim == 32 and str(folder.resolve()) in embedder.name


def test_balance_stores_cluster_ids_per_level_and_materialises_the_selection(pool, tmp_path):
    store, colours = pool
    report = balance_dataset(store, "pool", "pool_balanced", 12, SETTINGS)
    assert report.created and report.num_images == 12

    # the cluster ids per level read back equal a fresh clustering of the stored embeddings
    dataset_id, image_ids, _ = selectable_images(store, "pool")
    with store.pool.connection() as conn:
        (clustering_id,) = conn.execute("SELECT id FROM clusterings WHERE dataset_id = %s", (dataset_id,)).fetchone()
    stored_ids, point_clusters, _ = read_clusters(store, clustering_id)
    assert stored_ids.tolist() == image_ids and point_clusters.shape == (len(image_ids), 2)
    embeddings = load_embeddings(store, image_ids, SmallEmbedder().name)
    np.testing.assert_array_equal(point_clusters, hierarchical_kmeans(embeddings, SETTINGS).point_clusters)

    # the selection: same URIs and captions, decoded, and balanced over colours
    rows = selection_rows(store, "pool_balanced")
    assert len(rows) == 12 and all(uri in colours and caption and decoded for uri, caption, decoded, _ in rows)
    picked = [colours[uri] for uri, *_ in rows]
    assert picked.count("red") <= 12 * 24 / 38 / 2  # half the red share of the pool, or less
    assert set(picked) == set(COLOURS)

    # idempotent; another name with another target reuses the stored clustering
    again = balance_dataset(store, "pool", "pool_balanced", 12, SETTINGS)
    assert not again.created and again.dataset_id == report.dataset_id and selection_rows(store, "pool_balanced") == rows
    balance_dataset(store, "pool", "pool_balanced_6", 6, SETTINGS)
    with store.pool.connection() as conn:
        assert conn.execute("SELECT count(*) FROM clusterings").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM image_embeddings").fetchone()[0] == len(image_ids)
    with pytest.raises(StoreError, match="exists with other settings"):
        balance_dataset(store, "pool", "pool_balanced", 10, SETTINGS)
    with pytest.raises(StoreError, match="not a selection"):
        balance_dataset(store, "pool", "pool", 10, SETTINGS)
    with pytest.raises(StoreError, match=r"target must be in 1\.\.38"):
        balance_dataset(store, "pool", "too_many", 39, SETTINGS)

    # pack reads the selection like any dataset
    packed = pack_dataset(store, "pool_balanced", [16], tmp_path / "shards", PackSettings(pixel_multiple=4, shard_size=8))
    assert packed.num_samples == 12


def test_semantic_dedup_leaves_the_near_duplicates_inside_level_one_clusters_out_of_the_selection(pool):
    store, colours = pool
    threshold = 0.99
    report = balance_dataset(store, "pool", "pool_semdedup", 0, SETTINGS, semantic_dedup=threshold, fraction=1.0)
    _, image_ids, uris = selectable_images(store, "pool")
    with store.pool.connection() as conn:
        (clustering_id,) = conn.execute("SELECT id FROM clusterings").fetchone()
    clustered_ids, clusters, distances = read_clusters(store, clustering_id)
    embeddings = load_embeddings(store, image_ids, SmallEmbedder().name)
    duplicate = semantic_duplicates(embeddings, clusters[:, 0], distances, threshold)
    assert 0 < duplicate.sum() < len(image_ids)
    kept = sorted(uri for uri, is_duplicate in zip(uris, duplicate) if not is_duplicate)
    assert report.num_images == len(kept) and sorted(row[0] for row in selection_rows(store, "pool_semdedup")) == kept
    with pytest.raises(StoreError, match=f"target {len(kept) + 1} is more than the {len(kept)} images of 'pool' left after semantic dedup"):
        balance_dataset(store, "pool", "pool_semdedup_big", len(kept) + 1, SETTINGS, semantic_dedup=threshold)
    with pytest.raises(StoreError, match=r"cosine similarity in \(0, 1\], got 1.5"):
        balance_dataset(store, "pool", "pool_semdedup_bad", 3, SETTINGS, semantic_dedup=1.5)


def test_an_image_that_changed_since_decode_fails_balance_naming_it_and_keeps_the_embeddings_before_it(pool):
    store, colours = pool
    _, image_ids, uris = selectable_images(store, "pool")
    Path(uris[-1]).write_bytes(b"not an image any more")
    with pytest.raises(ValueError, match=f"{uris[-1]} was decoded but cannot be read now: UnidentifiedImageError"):
        balance_dataset(store, "pool", "pool_balanced", 12, SETTINGS)
    with pytest.raises(ValueError, match=f"{uris[-1]} was decoded"):
        embed_images(store, image_ids, uris, SmallEmbedder(), batch_size=16)
    with store.pool.connection() as conn:
        embedded = conn.execute("SELECT count(*) FROM image_embeddings").fetchone()[0]
    assert len(image_ids) == 38 and embedded == 32  # the two batches before the bad file's are stored


def test_curate_takes_the_top_images_by_a_filter_score(pool):
    store, _ = pool
    with pytest.raises(StoreError, match="run its job first"):
        curate_dataset(store, "pool", "pool_sft", 5, "rgb_entropy")
    run_worker(store, get_job("filters"))
    report = curate_dataset(store, "pool", "pool_sft", 5, "rgb_entropy")
    with store.pool.connection() as conn:
        expected = [uri for (uri,) in conn.execute(
            "SELECT uri FROM images i JOIN datasets d ON d.id = i.dataset_id WHERE d.name = 'pool'"
            " ORDER BY rgb_entropy DESC, i.id LIMIT 5"
        )]
    assert report.num_images == 5 and sorted(row[0] for row in selection_rows(store, "pool_sft")) == sorted(expected)
    fewest_white = curate_dataset(store, "pool", "pool_dark", 3, "white_ratio")  # lower is better
    assert fewest_white.num_images == 3
    with pytest.raises(StoreError, match="not a numeric column"):
        curate_dataset(store, "pool", "x", 3, "caption_long")
    with pytest.raises(StoreError, match=r"unknown dataset 'nope': ingest it first \(registered: .*pool"):
        curate_dataset(store, "nope", "x", 3, "rgb_entropy")


def test_quality_filter_keeps_the_images_within_every_bound(pool):
    from krea2_train.curate.balance import filter_dataset

    store, _ = pool
    with pytest.raises(StoreError, match="run its job first"):
        filter_dataset(store, "pool", "pool_clean", {"rgb_entropy": 1.0}, {})
    run_worker(store, get_job("filters"))
    with store.pool.connection() as conn:
        scores = conn.execute(
            "SELECT i.uri, rgb_entropy, white_ratio FROM images i JOIN datasets d ON d.id = i.dataset_id WHERE d.name = 'pool'"
        ).fetchall()
    entropies = sorted(entropy for _, entropy, _ in scores)
    low, high = entropies[5], entropies[-5]  # bounds that drop a few images at each end
    report = filter_dataset(store, "pool", "pool_clean", {"rgb_entropy": low}, {"rgb_entropy": high, "white_ratio": 0.5})
    expected = sorted(uri for uri, entropy, white in scores if low <= entropy <= high and white <= 0.5)
    assert 0 < report.num_images == len(expected) < len(scores)
    assert sorted(row[0] for row in selection_rows(store, "pool_clean")) == expected
    again = filter_dataset(store, "pool", "pool_clean", {"rgb_entropy": low}, {"rgb_entropy": high, "white_ratio": 0.5})
    assert not again.created and again.num_images == report.num_images  # derived once
    with pytest.raises(StoreError, match="no image of 'pool' passes the quality filter"):
        filter_dataset(store, "pool", "pool_none", {"rgb_entropy": entropies[-1] + 1}, {})
    with pytest.raises(StoreError, match="bounds of white_ratio are empty"):
        filter_dataset(store, "pool", "pool_x", {"white_ratio": 0.9}, {"white_ratio": 0.1})
    with pytest.raises(StoreError, match="not a numeric column"):
        filter_dataset(store, "pool", "pool_x", {"caption_long": 1.0}, {})


def test_a_stage_filters_before_it_curates(pool):
    """data.quality drops the extremes first; data.curate then picks from what is left."""
    from krea2_train.config import load_config
    from krea2_train.train.data import training_selection

    store, _ = pool
    run_worker(store, get_job("filters"))
    config = load_config("stage/sft", ["data.quality.enabled=true", "data.quality.maximum.white_ratio=0.5", "data.curate.top=3"])
    chosen = training_selection(store, config, "pool")
    with store.pool.connection() as conn:
        (filtered,) = conn.execute(
            "SELECT src.name FROM selections s JOIN datasets d ON d.id = s.dataset_id JOIN datasets src ON src.id = s.source_dataset_id"
            " WHERE d.name = %s", (chosen,)
        ).fetchone()
        method = conn.execute("SELECT method FROM selections s JOIN datasets d ON d.id = s.dataset_id WHERE d.name = %s", (filtered,)).fetchone()[0]
    assert filtered.startswith("pool__filter_") and method == "filter" and chosen.startswith(f"{filtered}__curate_")
    assert all(row[0] is not None for row in selection_rows(store, chosen)) and len(selection_rows(store, chosen)) == 3
    assert training_selection(store, config, "pool") == chosen  # derived once


def test_a_stage_balances_a_fraction_of_what_semantic_dedup_leaves(pool):
    from krea2_train.config import load_config
    from krea2_train.train.data import training_selection

    store, _ = pool
    overrides = ["data.balance.levels=[6,3]", "data.balance.resample_steps=2", "data.balance.points_per_cluster=3",
                 "data.balance.fraction=0.5"]
    plain = training_selection(store, load_config("stage/midtrain", overrides), "pool")
    deduplicated = training_selection(store, load_config("stage/midtrain", [*overrides, "data.balance.semantic_dedup=0.99"]), "pool")
    assert plain != deduplicated
    assert len(selection_rows(store, plain)) == 19  # half of the 38
    assert len(selection_rows(store, deduplicated)) == 14  # half of the 29 left (9 near-duplicates, as above)


def test_images_naming_rare_concepts_are_selected_first(pool, tmp_path, capsys):
    from krea2_train.config import load_config
    from krea2_train.curate.concepts import read_concepts
    from krea2_train.errors import UsageError
    from krea2_train.train.data import training_selection

    store, colours = pool
    concepts_path = tmp_path / "concepts.tsv"
    # captions read "a {colour} square number {index}": "yellow square" is in 2 of the 38, "number 3" in 3
    # (red, green, blue), "red square" in 24
    concepts_path.write_text("red square\nyellow square\nnumber 3\t0.5\nmamenchisaurus\n")
    concepts = read_concepts(concepts_path)
    # budget 0.5 x 8 = 4: yellow square (priority 1/2) takes both its images, number 3 (0.5/3) two of its three
    report = balance_dataset(store, "pool", "pool_concepts", 8, SETTINGS, concepts=concepts, images_per_concept=2, concept_share=0.5)
    captions = [caption for _, caption, *_ in selection_rows(store, "pool_concepts")]
    assert report.num_images == 8 and len(set(captions)) == 8
    assert {"a yellow square number 0", "a yellow square number 1"} <= set(captions)
    assert sum(caption.endswith("number 3") for caption in captions) >= 2
    balance_dataset(store, "pool", "pool_plain", 8, SETTINGS)  # without the list: one yellow square, one number 3
    plain_captions = [caption for _, caption, *_ in selection_rows(store, "pool_plain")]
    assert sum("yellow" in caption for caption in plain_captions) == 1
    assert sum(caption.endswith("number 3") for caption in plain_captions) == 1
    with pytest.raises(StoreError, match="images_per_concept must be >= 1 and concept_share in"):
        balance_dataset(store, "pool", "pool_concepts_bad", 8, SETTINGS, concepts=concepts, concept_share=1.5)

    # the stage setting: another selection than without it, and a bad list is a usage error naming the key
    overrides = ["data.balance.levels=[6,3]", "data.balance.resample_steps=2", "data.balance.points_per_cluster=3", "data.balance.fraction=0.25"]
    plain = training_selection(store, load_config("stage/midtrain", overrides), "pool")
    with_concepts = training_selection(store, load_config("stage/midtrain", [*overrides, f"data.balance.concepts={concepts_path}",
                                                                             "data.balance.images_per_concept=2",
                                                                             "data.balance.concept_share=0.5"]), "pool")
    assert {"a yellow square number 0", "a yellow square number 1"} <= {c for _, c, *_ in selection_rows(store, with_concepts)}
    number_3 = lambda name: sum(c.endswith("number 3") for _, c, *_ in selection_rows(store, name))  # noqa: E731
    assert number_3(with_concepts) >= 2 and number_3(plain) == 1  # budget 5: yellow square's 2, then number 3's 2
    print("WITH", [c for _, c, *_ in selection_rows(store, with_concepts)])
    concepts_path.write_text("red square\tmany\n")
    with pytest.raises(UsageError, match="data.balance.concepts: concept list .*line 1: weight 'many'"):
        training_selection(store, load_config("stage/midtrain", [*overrides, f"data.balance.concepts={concepts_path}"]), "pool")
    assert krea2(["data", "balance", "--dsn", store.dsn, "--dataset", "pool", "--target", "8", "--name", "x",
                  "--concepts", str(concepts_path)]) == 1
    assert "line 1: weight 'many' is not a positive number" in capsys.readouterr().err


def test_data_balance_and_curate_commands(fresh_database_dsn, tmp_path, capsys):
    write_pool(tmp_path / "pool")
    store_args = ["--dsn", fresh_database_dsn]
    assert krea2(["data", "ingest", *store_args, "--dataset", "pool", "--folder", str(tmp_path / "pool")]) == 0
    assert krea2(["data", "work", *store_args, "--job", "decode"]) == 0
    assert krea2(["data", "work", *store_args, "--job", "filters"]) == 0
    assert "have not been through dedup yet" in krea2_error(  # a selection now would keep duplicates
        ["data", "curate", *store_args, "--dataset", "pool", "--top", "4", "--by", "rgb_entropy", "--name", "early"], capsys)
    assert krea2(["data", "work", *store_args, "--job", "dedup"]) == 0
    assert krea2(["data", "balance", *store_args, "--dataset", "pool", "--target", "10", "--levels", "6", "3",
                  "--resample-steps", "2", "--points-per-cluster", "3", "--name", "mid"]) == 0
    out = capsys.readouterr().out
    assert "selection mid" in out and "10 images, balance of pool, created" in out
    assert "left after semantic dedup at 0.99" in krea2_error(  # 38 images, 9 of them near-duplicates
        ["data", "balance", *store_args, "--dataset", "pool", "--target", "30", "--levels", "6", "3", "--resample-steps", "2",
         "--points-per-cluster", "3", "--semantic-dedup", "0.99", "--name", "mid_dedup"], capsys)
    assert krea2(["data", "curate", *store_args, "--dataset", "pool", "--top", "4", "--by", "rgb_entropy", "--name", "sft"]) == 0
    assert "4 images, curate of pool, created" in capsys.readouterr().out
    assert krea2(["data", "filter", *store_args, "--dataset", "pool", "--min", "rgb_entropy=0.5", "--max", "white_ratio=0.99",
                  "--name", "clean"]) == 0
    assert "filter of pool, created" in capsys.readouterr().out
    assert "--min 'rgb_entropy' is not SCORE=VALUE" in krea2_error(
        ["data", "filter", *store_args, "--dataset", "pool", "--min", "rgb_entropy", "--name", "bad"], capsys)
    assert "bottom-up" in krea2_error(
        ["data", "balance", *store_args, "--dataset", "pool", "--target", "5", "--levels", "2", "6", "--name", "bad"], capsys)
    assert "--min/--max 'uri' is not a numeric column" in krea2_error(
        ["data", "filter", *store_args, "--dataset", "pool", "--min", "uri=0.5", "--name", "bad"], capsys)


def test_midtrain_stage_trains_on_the_balanced_selection(tmp_path, fresh_database_dsn):
    runs = tmp_path / "runs"
    args = [
        f"runs_root={runs}", "stage.init_from=null", "stage.steps=2", "checkpoint.interval=2",
        "logging.wandb=disabled", "logging.sample_steps=2", "logging.sample_prompts=[a red circle]",
        "data.num_samples=48", "data.num_workers=0", "data.global_batch_size=4", "data.resolution=256",
        "data.balance.levels=[8,2]",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "krea2_train", "--config", "stage/midtrain", *args],
        cwd=tmp_path, env={**os.environ, "KREA2_PG_DSN": fresh_database_dsn}, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    shards = json.loads((runs / "midtrain" / "manifest.json").read_text())
    assert sum(shard["num_samples"] for shard in shards) == 24  # data.balance.fraction 0.5 of 48
    assert all("__balance_" in shard["path"] for shard in shards)


def test_sft_selection_is_derived_once_from_the_shapes_world(tmp_path, fresh_store):
    from krea2_train.config import load_config
    from krea2_train.train.data import prepare_shapes

    config = load_config("stage/sft", [f"runs_root={tmp_path}", "data.num_samples=16", "data.curate.top=5"])
    dataset = prepare_shapes(fresh_store, config, tmp_path, image_side=64, pixel_multiple=4)
    assert "__curate_" in dataset
    assert prepare_shapes(fresh_store, config, tmp_path, image_side=64, pixel_multiple=4) == dataset
    with fresh_store.pool.connection() as conn:
        counts = conn.execute(
            "SELECT count(DISTINCT ss.image_id), count(DISTINCT sel.dataset_id) FROM selections sel"
            " JOIN shards s ON s.dataset_id = sel.dataset_id JOIN shard_samples ss ON ss.shard_id = s.id"
        ).fetchone()
    assert counts == (5, 1)


def test_merge_combines_sft_runs_by_name(tmp_path):
    from krea2_train.model import build_model, layouts
    from krea2_train.train.checkpoint import CheckpointManager, ModelOptimizerState, TrainState, write_model_config

    weights = {}
    for seed, name in enumerate(("sft_people", "sft_text", "sft_product")):
        torch.manual_seed(seed)
        model = build_model("tiny")
        run_dir = tmp_path / "runs" / name
        write_model_config(run_dir, model.config)
        manager = CheckpointManager(run_dir, interval=1, keep_last=1, async_mode="sync")
        manager.save(5, {"model": ModelOptimizerState(model, torch.optim.AdamW(model.parameters())), "train_state": TrainState(step=5)})
        weights[name] = {key: value.clone() for key, value in model.state_dict().items()}
    out = tmp_path / "generalist"
    argv = ["merge", "sft_people", "sft_text", "sft_product", "--weights", "2", "1", "1",
            "--runs-root", str(tmp_path / "runs"), "--out", str(out)]
    assert krea2(argv) == 0
    merged, _ = layouts.load_state_dict(out)
    for key, value in merged.items():
        expected = 0.5 * weights["sft_people"][key] + 0.25 * weights["sft_text"][key] + 0.25 * weights["sft_product"][key]
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=0, msg=key)


def test_a_selection_carries_its_job_results_and_refuses_nan_scores(pool, monkeypatch):
    """Selected copies are recorded as decoded, deduplicated and scored (no job reads their files
    again), but not as packed; a NaN score is refused like a missing one (it passes every bound)."""
    from krea2_train.curate import balance

    store, _ = pool
    run_worker(store, get_job("filters"))
    report = curate_dataset(store, "pool", "sft", top=5, by="rgb_entropy")
    with store.pool.connection() as conn:
        jobs = conn.execute(
            "SELECT j.job, count(*) FROM job_runs j JOIN images i ON i.id = j.image_id WHERE i.dataset_id = %s"
            " AND j.state = 'done' GROUP BY 1 ORDER BY 1", (report.dataset_id,),
        ).fetchall()
    assert jobs == [("decode", 5), ("dedup", 5), ("filters", 5)]
    for job in ("decode", "dedup", "filters"):
        assert run_worker(store, get_job(job)).claimed == 0
    with store.pool.connection() as conn:
        conn.execute("UPDATE images SET rgb_entropy = 'NaN' WHERE id = (SELECT min(id) FROM images WHERE dataset_id = 1)")
    with pytest.raises(StoreError, match="1 images of 'pool' have no rgb_entropy or a NaN one"):
        curate_dataset(store, "pool", "sft_nan", top=5, by="rgb_entropy")
    with pytest.raises(StoreError, match="lack a score of \\['rgb_entropy'\\] or have a NaN one"):
        filter_dataset(store, "pool", "clean_nan", {"rgb_entropy": 0.1}, {})

    # a second process derived the same selection between this one's check and its insert
    settings = {"top": 1}
    with store.pool.connection() as conn:
        image_id = conn.execute("SELECT max(id) FROM images WHERE dataset_id = 1").fetchone()[0]
    other = balance.materialise_selection(store, "pool", "raced", [image_id], "curate", settings)
    real_check, checks = balance.existing_selection, []

    def check_before_the_other_commit(*args):
        checks.append(args)
        return None if len(checks) == 1 else real_check(*args)

    monkeypatch.setattr(balance, "existing_selection", check_before_the_other_commit)
    again = balance.materialise_selection(store, "pool", "raced", [image_id], "curate", settings)
    assert (again.dataset_id, again.created, other.created) == (other.dataset_id, False, True)


def test_an_embedder_that_gives_nan_stores_nothing_and_names_the_image(pool, monkeypatch):
    store, _ = pool
    _, image_ids, uris = selectable_images(store, "pool")
    embedder = build_embedder("small")
    real_embed = embedder.embed

    def embed_with_a_nan(images):
        vectors = real_embed(images)
        vectors[1, 0] = float("nan")
        return vectors

    monkeypatch.setattr(embedder, "embed", embed_with_a_nan)
    with pytest.raises(StoreError, match=f"non-finite values for 1 image\\(s\\), not stored: {uris[1]}"):
        embed_images(store, image_ids[:4], uris[:4], embedder)
    with store.pool.connection() as conn:
        assert conn.execute("SELECT count(*) FROM image_embeddings").fetchone()[0] == 0


def stored_embedding_count(store) -> int:
    with store.pool.connection() as conn:
        return conn.execute("SELECT count(*) FROM image_embeddings").fetchone()[0]


def test_the_embed_job_embeds_each_selectable_image_once_for_every_target(pool, tmp_path, caplog):
    """`krea2 data work --job embed` embeds what balance would; balance then computes nothing; a
    new target sends the finished rows back, and a model directory a worker cannot load fails
    rows naming it."""
    import dataclasses

    from krea2_train.curate import balance

    store, _ = pool
    assert run_worker(store, get_job("embed")).claimed == 0  # no target: nothing to embed
    balance.add_embed_target(store, "pool", "small")
    with caplog.at_level("INFO"):
        stats = run_worker(store, get_job("embed"), batch_size=16, progress_every_s=0)
    assert (stats.completed, stats.failed) == (38, 0) and stored_embedding_count(store) == 38
    assert "job embed: 16 rows done, 0 failed, 0 lost by this worker" in caplog.text
    _, image_ids, uris = selectable_images(store, "pool")
    assert embed_images(store, image_ids, uris, SmallEmbedder()) == 0
    np.testing.assert_array_equal(load_embeddings(store, image_ids, SmallEmbedder().name), SmallEmbedder().embed(
        [Image.open(uri) for uri in uris]))

    balance.add_embed_target(store, "pool", "small")  # the same target again: nothing to redo
    assert run_worker(store, get_job("embed")).claimed == 0
    model_dir = tmp_path / "not_a_model"
    model_dir.mkdir()
    balance.add_embed_target(store, "pool", str(model_dir))
    one_attempt = dataclasses.replace(get_job("embed"), max_attempts=1)
    stats = run_worker(store, one_attempt, batch_size=38)
    assert (stats.claimed, stats.dead) == (38, 0) and stats.failed == 38
    with store.pool.connection() as conn:
        errors = conn.execute("SELECT DISTINCT error FROM job_runs WHERE job = 'embed' AND state = 'dead'").fetchall()
    assert len(errors) == 1 and f"{model_dir.resolve()} has no config.json" in errors[0][0]
    assert balance.remove_embed_target(store, "pool", str(model_dir))  # the rows it killed run again
    assert not balance.remove_embed_target(store, "pool", str(model_dir))
    stats = run_worker(store, get_job("embed"))
    assert (stats.claimed, stats.completed) == (38, 38) and stored_embedding_count(store) == 38


def test_a_target_removal_cut_short_is_finished_by_removing_it_again(pool, tmp_path, monkeypatch):
    """Cut short after the target was marked, the removal leaves a target the job no longer uses;
    removing it again sends back the rows it killed and deletes it."""
    import dataclasses

    from krea2_train.curate import balance

    store, _ = pool
    model_dir = tmp_path / "not_a_model"
    model_dir.mkdir()
    balance.add_embed_target(store, "pool", str(model_dir))
    assert run_worker(store, dataclasses.replace(get_job("embed"), max_attempts=1), batch_size=38).failed == 38

    def killed(conn, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(balance, "requeue_dataset", killed)
        with pytest.raises(KeyboardInterrupt):
            balance.remove_embed_target(store, "pool", str(model_dir))
    balance.add_embed_target(store, "pool", "small")  # a target that works
    assert run_worker(store, get_job("embed")).claimed == 0  # the killed rows are still dead
    assert balance.remove_embed_target(store, "pool", str(model_dir))
    assert not balance.remove_embed_target(store, "pool", str(model_dir))
    stats = run_worker(store, get_job("embed"))  # with the working target only
    assert (stats.claimed, stats.completed) == (38, 38) and stored_embedding_count(store) == 38


def test_a_target_added_while_workers_claim_reaches_every_row(pool, tmp_path, monkeypatch):
    """The target commits before the finished and running rows go back: a worker that claims rows
    in between reads it, so no row is finished with the old targets only."""
    from krea2_train.curate import balance
    from krea2_train.store.queue import Queue

    class Other(SmallEmbedder):
        def __init__(self):
            super().__init__()
            self.name = "other"

    store, _ = pool
    balance.add_embed_target(store, "pool", "small")
    assert Queue(store, get_job("embed")).seed() == 38  # pending, not yet run
    model_dir = tmp_path / "other_model"
    model_dir.mkdir()
    monkeypatch.setitem(balance._WORKER_EMBEDDERS, str(model_dir.resolve()), Other())
    real_requeue, in_between = balance.requeue_dataset, []

    def a_worker_runs_around_the_requeue(conn, *args, **kwargs):
        in_between.append(run_worker(store, get_job("embed")))
        real_requeue(conn, *args, **kwargs)
        in_between.append(run_worker(store, get_job("embed")))

    monkeypatch.setattr(balance, "requeue_dataset", a_worker_runs_around_the_requeue)
    balance.add_embed_target(store, "pool", str(model_dir))
    run_worker(store, get_job("embed"))
    assert in_between[0].completed == 38
    with store.pool.connection() as conn:
        counts = dict(conn.execute("SELECT embedder, count(*) FROM image_embeddings GROUP BY 1").fetchall())
    assert counts == {"small-b4-g4": 38, "other": 38}


def test_selections_take_their_source_images_embeddings(pool, monkeypatch):
    """An embedding belongs to a file: a selection of a selection is balanced without embedding
    any image again, and reads the same vectors as its source."""
    from krea2_train.curate import balance

    store, _ = pool
    balance_dataset(store, "pool", "mid", 20, SETTINGS)
    assert stored_embedding_count(store) == 38
    report = balance_dataset(store, "mid", "mid_of_mid", 10, SETTINGS)
    assert report.num_images == 10 and stored_embedding_count(store) == 38
    _, source_ids, source_uris = selectable_images(store, "pool")
    _, copy_ids, copy_uris = selectable_images(store, "mid")
    by_uri = dict(zip(source_uris, load_embeddings(store, source_ids, SmallEmbedder().name)))
    monkeypatch.setattr(balance, "EMBEDDING_PAGE", 3)  # read in pages: the same rows, in order
    copies = load_embeddings(store, copy_ids, SmallEmbedder().name)
    np.testing.assert_array_equal(copies, np.stack([by_uri[uri] for uri in copy_uris]))
    with pytest.raises(StoreError, match=r"1 images have no 'other' embedding \(first: image id"):
        load_embeddings(store, copy_ids[:1], "other")


def test_embedding_logs_its_progress(pool, monkeypatch, caplog):
    from krea2_train import logs

    store, _ = pool
    _, image_ids, uris = selectable_images(store, "pool")

    monkeypatch.setattr(logs, "PROGRESS_EVERY_S", 0.0)
    with caplog.at_level("INFO"):
        assert embed_images(store, image_ids, uris, SmallEmbedder(), batch_size=16) == 38
    lines = [line for line in caplog.text.splitlines() if "embedded " in line]
    assert len(lines) == 2 and "embedded with small-b4-g4: 16/38" in lines[0] and "images/s  eta " in lines[0]
    assert "embedded with small-b4-g4: 32/38" in lines[1]


def test_embed_workers_spread_over_the_nodes_gpus(fresh_database_dsn, capsys, monkeypatch, tmp_path):
    from krea2_train.data.commands import visible_gpus, worker_gpus

    assert worker_gpus(5, ["0", "1"]) == ["0", "1", "0", "1", "0"]
    assert worker_gpus(2, []) == [None, None]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert visible_gpus() == ["2", "5"]
    store_args = ["--dsn", fresh_database_dsn]
    assert "embedder must be 'small' or a local model directory; '/no/model' is neither" in krea2_error(
        ["data", "embed-target", *store_args, "--dataset", "pool", "--embedder", "/no/model"], capsys)
    assert krea2(["data", "work", *store_args, "--job", "embed"]) == 0
    assert "no embed target yet: `krea2 data embed-target" in capsys.readouterr().err
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    (tmp_path / "uris.txt").write_text(str(tmp_path / "a.png") + "\n")
    assert krea2(["data", "ingest", *store_args, "--dataset", "pool", "--uris", str(tmp_path / "uris.txt")]) == 0
    assert krea2(["data", "embed-target", *store_args, "--dataset", "pool", "--embedder", "/no/model", "--remove"]) == 0
    assert "embed target pool with /no/model: there was none" in capsys.readouterr().out
