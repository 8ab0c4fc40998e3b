"""Dataset ingest: the three sources, idempotent re-runs, clear errors on bad input."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from krea2_train.cli import main
from krea2_train.data.ingest import ingest
from krea2_train.store import StoreError

pytestmark = pytest.mark.postgres

ROW_QUERY = (
    "SELECT uri, caption_long, caption_medium, caption_short, facts, xmin::text, ingested_at"
    " FROM images ORDER BY uri"
)


def _write_sample(folder, name, long_caption, meta=None, suffix=".png"):
    Image.new("RGB", (32, 24), (10, 20, 30)).save(folder / f"{name}{suffix}")
    (folder / f"{name}.txt").write_text(long_caption + "\n")
    if meta is not None:
        (folder / f"{name}.json").write_text(json.dumps(meta))


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    _write_sample(root, "a", "a long caption", {"captions": {"medium": "medium a", "short": "a"}, "facts": {"n": 1}})
    _write_sample(root, "b", "b long caption")
    _write_sample(root / "sub", "c", "c long caption", {"captions": {"long": "ignored", "short": "c"}}, ".jpg")
    (root / "notes.md").write_text("not an image")
    return root


def _rows(store):
    with store.pool.connection() as conn:
        return conn.execute(ROW_QUERY).fetchall()


def test_folder_ingest_reads_captions_and_facts(fresh_store, folder):
    report = ingest(fresh_store, "toy", folder=folder)
    assert (report.rows, report.inserted, report.updated) == (3, 3, 0)
    rows = {row[0]: row[1:5] for row in _rows(fresh_store)}
    assert rows == {
        str(folder / "a.png"): ("a long caption", "medium a", "a", {"n": 1}),
        str(folder / "b.png"): ("b long caption", None, None, None),
        str(folder / "sub" / "c.jpg"): ("c long caption", None, "c", None),
    }


def test_second_ingest_changes_nothing(fresh_store, folder):
    ingest(fresh_store, "toy", folder=folder)
    before = _rows(fresh_store)
    again = ingest(fresh_store, "toy", folder=folder)
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 3)
    assert _rows(fresh_store) == before  # same contents, same xmin (no row version written), same ingested_at
    with fresh_store.pool.connection() as conn:
        assert conn.execute("SELECT count(*) FROM datasets").fetchone()[0] == 1


def test_changed_caption_updates_only_that_row(fresh_store, folder):
    ingest(fresh_store, "toy", folder=folder)
    before = {row[0]: row for row in _rows(fresh_store)}
    (folder / "b.txt").write_text("b rewritten\n")
    report = ingest(fresh_store, "toy", folder=folder)
    assert (report.inserted, report.updated) == (0, 1)
    after = {row[0]: row for row in _rows(fresh_store)}
    changed = [uri for uri in after if after[uri] != before[uri]]
    assert changed == [str(folder / "b.png")]
    assert after[changed[0]][1] == "b rewritten"
    assert after[changed[0]][6] > before[changed[0]][6]


def test_parquet_ingest(fresh_store, tmp_path):
    table = pa.table(
        {
            "uri": ["x/1.png", "/abs/2.png"],
            "caption_long": ["one", "two"],
            "caption_short": ["1", None],
            "facts": [json.dumps({"k": [1, 2]}), None],
            "ignored": [1, 2],
        }
    )
    path = tmp_path / "meta.parquet"
    pq.write_table(table, path)
    report = ingest(fresh_store, "pq", parquet=path)
    assert report.inserted == 2
    rows = {row[0]: row[1:5] for row in _rows(fresh_store)}
    assert rows == {
        str(tmp_path / "x" / "1.png"): ("one", None, "1", {"k": [1, 2]}),
        "/abs/2.png": ("two", None, None, None),
    }
    assert ingest(fresh_store, "pq", parquet=path).unchanged == 2


def test_parquet_without_uri_column_is_refused(fresh_store, tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"path": ["a.png"]}), path)
    with pytest.raises(StoreError, match="no 'uri' column"):
        ingest(fresh_store, "pq", parquet=path)


def test_uris_that_cannot_be_read_and_files_that_are_not_parquet_are_refused(fresh_store, folder, tmp_path):
    """Only local paths and file:// URIs are read: a list or parquet naming http or s3 URIs is
    refused at ingest (not left to fail decoding, retried for minutes); so is a uri that is not
    text, and a --parquet file that is not parquet."""
    listing = tmp_path / "list.txt"
    listing.write_text(f"{folder / 'a.png'}\nhttps://host/x.png\ns3://bucket/y.png\n")
    with pytest.raises(StoreError, match=r"names 2 URI\(s\) that cannot be read, nothing was ingested: https://host/x.png, s3://bucket/y.png"):
        ingest(fresh_store, "listed", uris=listing)
    for uris, message in ((["s3://bucket/y.png"], "row 0: s3://bucket/y.png: only local paths"), ([7], "row 0 has no uri .*7")):
        path = tmp_path / "remote.parquet"
        pq.write_table(pa.table({"uri": uris}), path)
        with pytest.raises(StoreError, match=message):
            ingest(fresh_store, "pq", parquet=path)
    not_parquet = tmp_path / "captions.txt"
    not_parquet.write_text("a cat\n")
    with pytest.raises(StoreError, match="does not read as a parquet file"):
        ingest(fresh_store, "pq", parquet=not_parquet)
    assert _rows(fresh_store) == [] and _datasets(fresh_store) == []


def test_a_parquet_file_damaged_after_its_header_is_named_with_the_rows_read(fresh_store, tmp_path):
    """Read in record batches, a damaged row group is met only when reached: a StoreError naming
    the file and the row, the rows before it kept (before: a pyarrow traceback)."""
    n = 3000
    path = tmp_path / "damaged.parquet"
    pq.write_table(pa.table({"uri": [f"/data/img{i}.png" for i in range(n)], "caption_long": [f"caption {i}" * 20 for i in range(n)]}),
                   path, row_group_size=1000)
    data = bytearray(path.read_bytes())
    start = pq.ParquetFile(path).metadata.row_group(2).column(1).data_page_offset
    data[start + 40 : start + 400] = b"\xff" * 360  # the third row group's caption page
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="damaged.parquet does not read past row 2000: .*The rows before it were ingested"):
        ingest(fresh_store, "damaged", parquet=path)
    assert len(_rows(fresh_store)) == 2000


def test_uri_list_uses_sidecars_and_refuses_duplicates(fresh_store, folder, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two images\n{folder / 'a.png'}\n\nfile://{folder / 'b.png'}\n")
    report = ingest(fresh_store, "listed", uris=listing)
    assert report.inserted == 2
    captions = sorted(row[1] for row in _rows(fresh_store))
    assert captions == ["a long caption", "b long caption"]
    listing.write_text(f"{folder / 'a.png'}\n{folder / 'a.png'}\n")
    with pytest.raises(StoreError, match=r"a\.png appears twice"):
        ingest(fresh_store, "listed", uris=listing)


def test_invalid_sidecar_json_names_the_file(fresh_store, folder):
    (folder / "b.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"invalid JSON in .*b\.json"):
        ingest(fresh_store, "toy", folder=folder)
    for text, message in (('{"captions": "a cat"}', "'captions' must be an object of texts"),
                          ('{"captions": {"long": 5}}', "'captions' must be an object of texts"),
                          ('{"facts": [1]}', "'facts' must be an object")):
        (folder / "b.json").write_text(text)
        with pytest.raises(StoreError, match=r"b\.json: " + message):
            ingest(fresh_store, "toy", folder=folder)
    (folder / "b.json").unlink()
    (folder / "b.txt").write_bytes("un caf\xe9".encode("latin-1"))
    with pytest.raises(StoreError, match=r"caption file .*b\.txt is not UTF-8 text"):
        ingest(fresh_store, "toy", folder=folder)
    assert _datasets(fresh_store) == []  # each failed ingest left the registry as it found it


def test_a_failed_ingest_into_an_existing_dataset_keeps_its_source(fresh_store, folder, tmp_path):
    ingest(fresh_store, "toy", folder=folder)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{folder / 'a.png'}\n{folder / 'a.png'}\n")
    with pytest.raises(StoreError, match="appears twice"):
        ingest(fresh_store, "toy", uris=listing)
    with fresh_store.pool.connection() as conn:
        assert conn.execute("SELECT source FROM datasets WHERE name = 'toy'").fetchone()[0] == f"folder:{folder.resolve()}"


def test_missing_folder_is_refused(fresh_store, tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        ingest(fresh_store, "toy", folder=tmp_path / "nope")
    (tmp_path / "list.txt").write_text("a.png\n")
    with pytest.raises(StoreError, match="list.txt is a file, not a folder"):
        ingest(fresh_store, "toy", folder=tmp_path / "list.txt")


def test_cli_ingest_twice_and_status(fresh_store, folder, capsys):
    argv = ["data", "ingest", "--dsn", fresh_store.dsn, "--dataset", "toy", "--folder", str(folder)]
    assert main(argv) == 0
    assert "3 inserted" in capsys.readouterr().out
    assert main(argv) == 0
    assert "0 inserted, 0 updated, 3 unchanged" in capsys.readouterr().out
    assert main(["data", "status", "--dsn", fresh_store.dsn]) == 0
    status = capsys.readouterr().out
    assert any(line.split()[:2] == ["toy", "3"] for line in status.splitlines())


def _datasets(store):
    with store.pool.connection() as conn:
        return conn.execute("SELECT name FROM datasets").fetchall()


def test_empty_folder_is_refused_naming_it(fresh_store, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("a caption without an image")
    argv = ["data", "ingest", "--dsn", fresh_store.dsn, "--dataset", "toy", "--folder", str(empty)]
    assert main(argv) == 1
    assert f"krea2: error: image folder {empty} holds no images" in capsys.readouterr().err
    assert _datasets(fresh_store) == []


def test_empty_uri_list_is_refused(fresh_store, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("# nothing yet\n")
    with pytest.raises(StoreError, match=f"no images in uris:{listing}"):
        ingest(fresh_store, "listed", uris=listing)
    assert _datasets(fresh_store) == []


def test_uri_list_naming_missing_files_is_refused_and_nothing_is_inserted(fresh_store, folder, tmp_path, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{folder / 'a.png'}\n{folder / 'gone.png'}\nfile://{folder / 'lost.png'}\nhttps://host/x.png\n")
    argv = ["data", "ingest", "--dsn", fresh_store.dsn, "--dataset", "listed", "--uris", str(listing)]
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert f"names 2 file(s) that do not exist, nothing was ingested: {folder / 'gone.png'}, {folder / 'lost.png'}" in error
    assert _rows(fresh_store) == [] and _datasets(fresh_store) == []


@pytest.mark.parametrize(
    ("column", "value", "field"),
    [("caption_long", "a cat\x00 on a mat", "caption_long"), ("facts", json.dumps({"note": "scraped\x00"}), "facts")],
)
def test_a_nul_character_stops_the_ingest_before_its_batch_naming_the_row(fresh_store, tmp_path, capsys, column, value, field):
    """PostgreSQL text and jsonb cannot hold a NUL: the ingest (streamed, 500 rows a batch) stops
    before the batch with row 1100, naming the row and the field; the rows before it are kept,
    and the same ingest of the fixed file completes the dataset."""
    n = 1200
    values = [json.dumps({"i": i}) if column == "facts" else f"caption {i}" for i in range(n)]
    uris = [f"/data/bucket/img{i}.jpg" for i in range(n)]
    path = tmp_path / "scraped.parquet"
    pq.write_table(pa.table({"uri": uris, column: values[:1100] + [value] + values[1101:]}), path)
    argv = ["data", "ingest", "--dsn", fresh_store.dsn, "--dataset", "scraped", "--parquet", str(path)]
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert "1 value(s) hold a NUL character" in error and f"{field} of row 1100 (/data/bucket/img1100.jpg)" in error
    assert "The 1000 rows before this batch were ingested" in error and "run the same ingest again" in error
    assert len(_rows(fresh_store)) == 1000
    pq.write_table(pa.table({"uri": uris, column: values}), path)
    assert main(argv) == 0
    assert len(_rows(fresh_store)) == n


def test_images_without_a_caption_are_counted_and_reported(fresh_store, folder, capsys):
    (folder / "b.txt").unlink()
    Image.new("RGB", (32, 24)).save(folder / "d.png")
    report = ingest(fresh_store, "toy", folder=folder)
    assert (report.rows, report.uncaptioned, report.uncaptioned_example) == (4, 2, str(folder / "b.png"))
    assert main(["data", "ingest", "--dsn", fresh_store.dsn, "--dataset", "toy", "--folder", str(folder)]) == 0
    warning = capsys.readouterr().err
    assert "2 of 4 images have no long caption" in warning and str(folder / "b.png") in warning and "never packed" in warning


def test_dataset_counts_say_why_images_are_left_out(fresh_store, folder, capsys):
    """What `krea2 data status` prints and a run logs before training: each image counted once,
    under the first reason it is not packed."""
    from krea2_train.data.pack import dataset_counts

    (folder / "b.txt").unlink()
    for name in ("d", "e", "f"):
        Image.new("RGB", (32, 24)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"{name} long caption")
    ingest(fresh_store, "toy", folder=folder)
    (counts,) = dataset_counts(fresh_store, "toy")
    assert (counts.images, counts.unchecked, counts.packable) == (6, 6, 0)
    with fresh_store.pool.connection() as conn:  # what the decode and dedup jobs would record
        conn.execute("UPDATE images SET decode_ok = uri NOT LIKE '%%/c.jpg'")
        conn.execute("UPDATE images SET decode_error = 'cannot identify image file' WHERE uri LIKE '%%/c.jpg'")
        conn.execute("UPDATE images SET duplicate_of = (SELECT id FROM images WHERE uri LIKE '%%/d.png') WHERE uri LIKE '%%/e.png'")
        conn.execute("UPDATE images SET decode_ok = NULL WHERE uri LIKE '%%/f.png'")
    (counts,) = dataset_counts(fresh_store, "toy")
    assert (counts.packable, counts.unchecked, counts.undecodable, counts.duplicates, counts.uncaptioned) == (2, 1, 1, 1, 1)
    assert counts.left_out() == "1 not yet decoded, 1 undecodable, 1 duplicates, 1 without a long caption"
    assert main(["data", "status", "--dsn", fresh_store.dsn]) == 0
    assert ["toy", "6", "2", "1", "1", "1", "1"] in [line.split() for line in capsys.readouterr().out.splitlines()]
    assert main(["data", "status", "--dsn", fresh_store.dsn, "--errors"]) == 0  # which images, and why
    listed = capsys.readouterr().out
    assert "undecodable images (first 20):" in listed and "/c.jpg: cannot identify image file" in listed and "no dead job" in listed


def test_seen_hashes_finds_every_repeat_across_calls_and_within_one():
    """The log-structured set of URI hashes: repeats found in an earlier call or earlier in the
    same call, its runs merged as they grow (a few dozen at most for any size)."""
    from krea2_train.data.ingest import SeenHashes

    seen = SeenHashes()
    for start in range(0, 5000, 100):
        assert seen.add([f"/data/{i}.png" for i in range(start, start + 100)]) == []
    assert len(seen) == 5000 and [len(run) for run in seen.runs] == [3200, 1600, 200]  # a binary counter: 50 = 32 + 16 + 2
    assert all((run[1:] > run[:-1]).all() for run in seen.runs)  # each run sorted (distinct here: no collision)
    assert seen.add(["/data/new-1.png", "/data/17.png", "/data/new-2.png", "/data/new-1.png", "/data/4999.png"]) == [1, 3, 4]


def test_a_uri_repeated_in_a_later_batch_of_a_parquet_file_is_refused_and_a_hash_collision_is_not(fresh_store, tmp_path, monkeypatch):
    from krea2_train.data import ingest as ingest_module

    uris = [f"/data/{i}.png" for i in range(2 * ingest_module.BATCH_ROWS + 10)]
    path = tmp_path / "meta.parquet"
    pq.write_table(pa.table({"uri": uris + ["/data/3.png"], "caption_long": ["c"] * (len(uris) + 1)}), path)
    with pytest.raises(StoreError, match=r"URI /data/3\.png appears twice in parquet:"):
        ingest(fresh_store, "repeat", parquet=path)

    # two different URIs whose hashes collide: the source is read again to tell, and both are ingested
    real_hashes = ingest_module.SeenHashes.hashes
    colliding = {"/data/7.png", f"/data/{len(uris) - 1}.png"}
    monkeypatch.setattr(ingest_module.SeenHashes, "hashes",
                        staticmethod(lambda keys: np.where([key in colliding for key in keys], np.uint64(42), real_hashes(keys))))
    pq.write_table(pa.table({"uri": uris, "caption_long": ["c"] * len(uris)}), path)
    report = ingest(fresh_store, "collision", parquet=path)
    assert report.inserted == len(uris)
