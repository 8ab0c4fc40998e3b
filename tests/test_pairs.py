"""Human preference pairs: the shapes world's pairs, ingest, pair shards, and the loader on them."""

import json

import pytest
import torch

from krea2_train.curate.images import open_rgb
from krea2_train.curate.jobs import DECODE
from krea2_train.data.buckets import make_buckets, resize_to_bucket
from krea2_train.data.ingest import registered_dataset
from krea2_train.data.loader import LoaderConfig, ShardLoader, pil_to_tensor, query_manifest
from krea2_train.data.pack import PackSettings
from krea2_train.data.pairs import ingest_pairs, pack_pairs, pair_counts, read_pair_file
from krea2_train.data.plan import Manifest, ShardInfo
from krea2_train.data.shapes import check_image, make_pair, make_sample, score_facts, write_shapes_pairs
from krea2_train.data.shards import ShardError, ShardReader, decode_image
from krea2_train.store import StoreError
from krea2_train.store.queue import run_worker


def test_a_shapes_pair_is_the_prompt_and_the_same_scene_with_one_shape_recoloured():
    for index in range(6):
        winner, loser, captions, facts = make_pair(index, 96, seed=4)
        image, sample_captions, sample_facts = make_sample(index, 96, seed=4)
        assert (captions, facts) == (sample_captions, sample_facts)
        assert winner.tobytes() == image.tobytes() and winner.size == loser.size
        detected_winner, detected_loser = check_image(winner), check_image(loser)
        assert score_facts(facts, detected_winner)["all"]
        judged = score_facts(facts, detected_loser)
        assert not judged["all"] and sum(judged["colors"]) == len(facts["shapes"]) - 1  # one colour is wrong
        assert [s["kind"] for s in detected_loser["shapes"]] == [s["kind"] for s in detected_winner["shapes"]]
    winner_again, loser_again, *_ = make_pair(5, 96, seed=4)
    assert loser_again.tobytes() == loser.tobytes()  # a pure function of its arguments


def write_pair_file(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_pair_file_with_bad_rows_is_refused_naming_them(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"x")
    good = {"prompt": "a red circle", "winner": "a.png", "loser": "b.png"}
    pairs = read_pair_file(write_pair_file(tmp_path / "ok.jsonl", [good, good | {"winner": "b.png", "loser": "a.png"}]))
    assert pairs[0].winner == str(tmp_path / "a.png") and pairs[1].loser == str(tmp_path / "a.png")  # relative to the file
    as_uri = read_pair_file(write_pair_file(tmp_path / "uri.jsonl", [good | {"winner": f"file://{tmp_path}/a%2Epng"}]))
    assert as_uri[0].winner == str(tmp_path / "a.png")  # a file:// URI is stored as the path
    cases = {
        "row 2: no prompt": [good, good | {"prompt": " "}],
        "row 1: no loser": [{"prompt": "p", "winner": "a.png"}],
        "row 1: prompt is int 7, not text": [good | {"prompt": 7}],
        "row 1: no winner; loser is list \\['b.png'\\], not text": [good | {"winner": None, "loser": ["b.png"]}],
        "row 2: the winner is the loser": [good, good | {"loser": "a.png"}],
        "1 image\\(s\\) that do not exist: .*missing.png": [good | {"loser": "missing.png"}],
        "row 1: not an object": [["a.png", "b.png"]],
        "row 1: the winner is the loser": [good | {"winner": f"file://{tmp_path}/a.png", "loser": "a.png"}],  # two spellings
        "1 image\\(s\\) that do not exist: .*gone.png": [good | {"loser": f"file://{tmp_path}/gone.png"}],
        "row 1: a NUL character .* in prompt": [good | {"prompt": "a red\x00circle"}],
        "1 image URI\\(s\\) that cannot be read: https://host/l.png \\(only local paths": [good | {"loser": "https://host/l.png"}],
    }
    for message, rows in cases.items():
        with pytest.raises(StoreError, match=f"nothing was ingested: .*{message}"):
            read_pair_file(write_pair_file(tmp_path / "bad.jsonl", rows))
    (tmp_path / "utf16.jsonl").write_bytes(b"\xff\xfe" + json.dumps(good).encode("utf-16-le"))
    with pytest.raises(StoreError, match="utf16.jsonl is not UTF-8 text"):
        read_pair_file(tmp_path / "utf16.jsonl")
    (tmp_path / "text.parquet").write_text("prompt,winner,loser\n")
    with pytest.raises(StoreError, match="text.parquet does not read as a parquet file"):
        read_pair_file(tmp_path / "text.parquet")
    (tmp_path / "broken.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(StoreError, match="line 2 is not JSON"):
        read_pair_file(tmp_path / "broken.jsonl")
    with pytest.raises(StoreError, match="must end in .jsonl or .parquet"):
        read_pair_file(tmp_path / "pairs.csv")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(StoreError, match="holds no pairs"):
        read_pair_file(tmp_path / "empty.jsonl")


@pytest.fixture
def shapes_pairs(fresh_store, tmp_path):
    """Eight shapes-world pairs in two aspect buckets, ingested as dataset ``prefs`` and decoded."""
    pair_file = write_shapes_pairs(tmp_path / "pairs", 8, 64, seed=2, aspect_ratios=[1, "4:3"])
    report = ingest_pairs(fresh_store, "prefs", pair_file)
    assert (report.pairs, report.images, report.inserted) == (8, 16, 8)
    run_worker(fresh_store, DECODE)
    return pair_file


SETTINGS = PackSettings(pixel_multiple=4, shard_size=3, seed=1, aspect_ratios=("1:1", "4:3"))


@pytest.mark.postgres
def test_ingesting_pairs_again_changes_nothing(fresh_store, shapes_pairs):
    again = ingest_pairs(fresh_store, "prefs", shapes_pairs)
    assert (again.pairs, again.inserted) == (8, 0)
    lines = [json.loads(line) for line in shapes_pairs.read_text().splitlines()]
    with fresh_store.pool.connection() as conn:
        rows = conn.execute(
            "SELECT p.prompt, w.uri, l.uri, w.caption_long FROM preference_pairs p JOIN images w ON w.id = p.winner_id"
            " JOIN images l ON l.id = p.loser_id ORDER BY p.id"
        ).fetchall()
    folder = shapes_pairs.parent
    assert rows == [(line["prompt"], str(folder / line["winner"]), str(folder / line["loser"]), line["prompt"]) for line in lines]
    assert pair_counts(fresh_store, "prefs")[0].packable == 8


@pytest.mark.postgres
def test_pairs_pack_into_one_bucket_per_pair_once(fresh_store, shapes_pairs, tmp_path, monkeypatch):
    from krea2_train.data import pack

    monkeypatch.setattr(pack, "SIZES_PAGE", 3)  # the pairs' sizes are read in pages: 3 + 3 + 2
    report = pack_pairs(fresh_store, "prefs", [32], tmp_path / "shards", SETTINGS)
    assert report.num_samples == 8 and not report.unreadable
    with fresh_store.pool.connection() as conn:
        pairs = {pair_id: (prompt, winner, loser, winner_id, loser_id) for pair_id, prompt, winner, loser, winner_id, loser_id in conn.execute(
            "SELECT p.id, p.prompt, w.uri, l.uri, w.id, l.id FROM preference_pairs p JOIN images w ON w.id = p.winner_id"
            " JOIN images l ON l.id = p.loser_id").fetchall()}
        shards = conn.execute("SELECT id, path, kind, bucket FROM shards ORDER BY id").fetchall()
        recorded = dict(conn.execute('SELECT pair_id, shard_id FROM shard_pairs WHERE resolution = 32').fetchall())
        assert conn.execute("SELECT count(*) FROM shard_samples").fetchone() == (0,)  # pairs are not single images
    assert {kind for _, _, kind, _ in shards} == {"pairs"} and {bucket for *_, bucket in shards} == {"1:1", "4:3"}
    assert sorted(recorded) == sorted(pairs)
    buckets = {bucket.name: bucket for bucket in make_buckets(32, 4, SETTINGS.aspect_ratios)}
    seen = []
    for shard_id, path, _, bucket in shards:
        with ShardReader(path) as reader:
            assert reader.header.kind == "pairs" and "/pairs/" in path
            for row in range(reader.num_samples):
                sample = reader.read(row)
                prompt, winner, loser, winner_id, loser_id = pairs[sample.sample_id]
                assert recorded[sample.sample_id] == shard_id and sample.captions["long"] == prompt
                assert sample.facts == {"winner_id": winner_id, "loser_id": loser_id}
                for stored, uri in ((sample.image_bytes, winner), (sample.loser_image_bytes, loser)):
                    assert decode_image(stored).tobytes() == resize_to_bucket(open_rgb(uri), buckets[bucket]).tobytes()
                seen.append(sample.sample_id)
    assert sorted(seen) == sorted(pairs)  # every pair once
    assert pack_pairs(fresh_store, "prefs", [32], tmp_path / "shards", SETTINGS).num_samples == 0  # nothing new

    more = write_shapes_pairs(tmp_path / "more", 2, 48, seed=9)
    assert ingest_pairs(fresh_store, "prefs", more).inserted == 2
    run_worker(fresh_store, DECODE)
    assert pack_pairs(fresh_store, "prefs", [32], tmp_path / "shards", SETTINGS).num_samples == 2  # only the new ones


@pytest.mark.postgres
def test_a_pair_with_an_undecodable_image_is_counted_and_never_packed(fresh_store, tmp_path):
    pair_file = write_shapes_pairs(tmp_path / "pairs", 4, 32, seed=1)
    (tmp_path / "pairs" / "000002_loser.png").write_bytes(b"not a png")
    ingest_pairs(fresh_store, "prefs", pair_file)
    (counts,) = pair_counts(fresh_store, "prefs")
    assert (counts.pairs, counts.packable, counts.undecoded) == (4, 0, 4)
    run_worker(fresh_store, DECODE)
    (counts,) = pair_counts(fresh_store)
    assert (counts.name, counts.packable, counts.undecoded, counts.undecodable) == ("prefs", 3, 0, 1)
    assert pack_pairs(fresh_store, "prefs", [32], tmp_path / "shards", PackSettings(pixel_multiple=4)).num_samples == 3
    with registered_dataset(fresh_store, "images_only", "test"):
        pass
    with pytest.raises(StoreError, match="'images_only' has no preference pairs: ingest them"):
        pack_pairs(fresh_store, "images_only", [32], tmp_path / "shards")


@pytest.mark.postgres
def test_the_loader_reads_each_winner_with_its_own_loser(fresh_store, shapes_pairs, tmp_path):
    pack_pairs(fresh_store, "prefs", [32], tmp_path / "shards", SETTINGS)
    with fresh_store.pool.connection() as conn:
        manifest = query_manifest(conn, ["prefs"], 32, kind="pairs")
        uris = {pair_id: (winner, loser) for pair_id, winner, loser in conn.execute(
            "SELECT p.id, w.uri, l.uri FROM preference_pairs p JOIN images w ON w.id = p.winner_id JOIN images l ON l.id = p.loser_id")}
        with pytest.raises(ValueError, match="no ready shards of images for datasets \\['prefs'\\]"):
            query_manifest(conn, ["prefs"], 32)
    assert manifest.kind == "pairs" and manifest.num_samples == 8
    buckets = {bucket.name: bucket for bucket in make_buckets(32, 4, SETTINGS.aspect_ratios)}
    loader = ShardLoader(manifest, LoaderConfig(global_batch_size=2, seed=3, num_workers=0))
    seen = []
    for batch in loader:
        assert batch.loser_images.shape == batch.images.shape
        for slot, pair_id in enumerate(batch.sample_ids.tolist()):
            winner, loser = (pil_to_tensor(resize_to_bucket(open_rgb(uri), buckets[batch.bucket])) for uri in uris[pair_id])
            assert torch.equal(batch.images[slot], winner) and torch.equal(batch.loser_images[slot], loser)
            seen.append(pair_id)
    assert len(seen) == len(set(seen)) >= 6  # a bucket's remainder below a batch waits for the next epoch


def test_a_manifest_holds_one_kind_and_an_images_manifest_keeps_its_fingerprint(tmp_path):
    shard = ShardInfo(1, "/a.arrow", "1:1", 32, 32, 4, "0" * 64)
    images = Manifest([shard])
    assert images.kind == "images" and "kind" not in json.loads(images.to_json())[0]  # pinned runs keep their fingerprint
    pairs = Manifest([ShardInfo(2, "/b.arrow", "1:1", 32, 32, 4, "0" * 64, kind="pairs")])
    assert pairs.kind == "pairs" and Manifest.from_json(pairs.to_json()).kind == "pairs"
    with pytest.raises(ValueError, match="mixes shards of images and pairs"):
        Manifest([shard, ShardInfo(2, "/b.arrow", "1:1", 32, 32, 4, "0" * 64, kind="pairs")])


@pytest.mark.postgres
def test_a_shard_of_another_kind_than_its_manifest_says_is_refused(fresh_store, shapes_pairs, tmp_path):
    from krea2_train.data.loader import _check_header

    pack_pairs(fresh_store, "prefs", [32], tmp_path / "shards", SETTINGS)
    with fresh_store.pool.connection() as conn:
        shard = query_manifest(conn, ["prefs"], 32, kind="pairs").shards[0]
    as_images = ShardInfo(**{**shard.__dict__, "kind": "images"})
    with pytest.raises(ShardError, match="pairs of .* the manifest says .* images"):
        _check_header(ShardReader(shard.path), as_images)


@pytest.mark.postgres
def test_the_commands_write_ingest_pack_and_count_pairs(fresh_store, tmp_path, capsys):
    from krea2_train.cli import main

    store = ["--dsn", fresh_store.dsn]
    assert main(["data", "shapes", "--pairs", "--out", str(tmp_path / "pairs"), "--n", "5", "--resolution", "32"]) == 0
    pair_file = tmp_path / "pairs" / "pairs.jsonl"
    printed = capsys.readouterr().out.split("register them with krea2 ")[1].split()
    assert printed == ["data", "ingest-pairs", "--dataset", "shapes_pairs", "--pairs", str(pair_file)]
    assert main([*printed, *store]) == 0  # the printed command works as it is
    capsys.readouterr()
    assert main(["data", "ingest-pairs", *store, "--dataset", "prefs", "--pairs", str(pair_file)]) == 0
    assert "5 pairs of 10 images, 5 new pairs" in capsys.readouterr().out
    assert main(["data", "status", *store]) == 0
    status = capsys.readouterr().out
    assert "preference pairs" in status and any(line.split() == ["prefs", "5", "0", "5", "0"] for line in status.splitlines())
    pack = ["data", "pack-pairs", *store, "--dataset", "prefs", "--resolution", "32", "--out", str(tmp_path / "shards"), "--pixel-multiple", "4"]
    assert main(pack) == 0  # decodes, then packs
    assert "packed 5 new pairs of prefs at 32 px into 1 shards" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:  # by the parser, before any work
        main(pack + ["--shard-size", "0"])
    assert refused.value.code == 2 and "argument --shard-size: must be a positive integer, got 0" in capsys.readouterr().err
    assert main(["data", "ingest-pairs", *store, "--dataset", "prefs", "--pairs", str(tmp_path / "missing.jsonl")]) == 1
    assert "pair file" in capsys.readouterr().err


@pytest.mark.postgres
def test_pairs_go_into_a_dataset_of_their_own_and_never_rewrite_an_image(fresh_store, tmp_path):
    from krea2_train.data.ingest import ingest
    from krea2_train.data.shapes import write_shapes_dataset

    folder = write_shapes_dataset(tmp_path / "web", 3, 32)
    ingest(fresh_store, "web", folder=folder)
    pair_file = write_pair_file(tmp_path / "web" / "pairs.jsonl", [{"prompt": "p", "winner": "000000.png", "loser": "000001.png"}])
    with fresh_store.pool.connection() as conn:
        before = conn.execute("SELECT uri, caption_long, caption_short, facts FROM images ORDER BY id").fetchall()
    with pytest.raises(StoreError, match="'web' holds 3 images that are in no preference pair: .*--dataset web_pairs"):
        ingest_pairs(fresh_store, "web", pair_file)
    with fresh_store.pool.connection() as conn:
        assert conn.execute("SELECT uri, caption_long, caption_short, facts FROM images ORDER BY id").fetchall() == before
        assert conn.execute("SELECT count(*) FROM preference_pairs").fetchone() == (0,)
        assert conn.execute("SELECT source FROM datasets WHERE name = 'web'").fetchone() == (f"folder:{folder.resolve()}",)

    # in a dataset of pairs, an image keeps the caption of the pair that registered it first
    assert ingest_pairs(fresh_store, "web_pairs", pair_file).inserted == 1
    other = write_pair_file(tmp_path / "web" / "more.jsonl", [{"prompt": "another prompt", "winner": "000001.png", "loser": "000002.png"}])
    assert ingest_pairs(fresh_store, "web_pairs", other).inserted == 1
    with fresh_store.pool.connection() as conn:
        captions = dict(conn.execute(
            "SELECT i.uri, i.caption_long FROM images i JOIN datasets d ON d.id = i.dataset_id WHERE d.name = 'web_pairs'").fetchall())
    assert captions == {str(folder / "000000.png"): "p", str(folder / "000001.png"): "p", str(folder / "000002.png"): "another prompt"}


@pytest.mark.postgres
def test_packing_pairs_records_a_target_that_later_packs_and_runs_follow(fresh_store, shapes_pairs, tmp_path):
    from krea2_train.data.pack import find_pack_target
    from krea2_train.errors import UsageError
    from krea2_train.train.data import check_packed_buckets

    pack_pairs(fresh_store, "prefs", [32], tmp_path / "shards", SETTINGS)
    out_dir, settings = find_pack_target(fresh_store, "prefs", 32, "pairs")
    assert out_dir == (tmp_path / "shards").resolve() and settings == SETTINGS
    assert find_pack_target(fresh_store, "prefs", 32) is None  # no target of single images: the pack job leaves them
    assert check_packed_buckets(fresh_store, "prefs", 32, ["1:1"], kind="pairs") == SETTINGS
    with pytest.raises(UsageError, match="packed at 32 px in buckets \\['1:1', '4:3'\\] only: .*krea2 data ingest-pairs"):
        check_packed_buckets(fresh_store, "prefs", 32, ["1:1", "16:9"], kind="pairs")
