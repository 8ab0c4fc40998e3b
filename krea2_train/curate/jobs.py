"""The curation jobs and the job registry's contents.

    decode   every image: read, decode, size checks, md5, perceptual and colour hashes
    filters  decoded images: Laplacian variance, RGB entropy, white/black pixel ratios
    dedup    decoded images, once no image of their dataset is still undecoded (decode rows that
             died excepted):
             duplicate_of = the oldest earlier image with the same md5, or with a perceptual
             hash within PHASH_MAX_DISTANCE bits and a colour hash within COLOR_MAX_DISTANCE
    embed    (krea2_train.curate.balance) selectable images of datasets with an embed target:
             their image embeddings, for balanced selections (on a GPU when the worker has one)
    pack     (krea2_train.data.pack) resize and pack into shards

Importing this module registers them; ``load_jobs()`` also imports the embed and pack jobs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from PIL import UnidentifiedImageError
from psycopg.types.json import Jsonb

from krea2_train.curate.filters import quality_scores
from krea2_train.curate.hashing import color_hash, md5_hex, perceptual_hash, phash_bands
from krea2_train.curate.images import decode_bytes, open_rgb, read_uri
from krea2_train.store.db import find_dataset_id
from krea2_train.store.queue import Done, Failed, Job, JobContext, Outcome, register_job, registered_jobs

MIN_SIDE = 16            # images with a shorter side are refused by the decode job
PHASH_MAX_DISTANCE = 11  # of 144 bits; the 12 phash bands find every pair this close
COLOR_MAX_DISTANCE = 6   # summed colour-level differences (of 12 x 7)
PLUGIN_MODULES = ("krea2_train.data.pack", "krea2_train.curate.balance")


def per_row(function: Callable[[dict], dict]) -> Callable[[list[dict], JobContext], list[Outcome]]:
    """A batch handler from a per-row function; an exception fails only its row."""

    def handler(rows: list[dict], ctx: JobContext) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for row in rows:
            try:
                outcomes.append(Done(function(row)))
            except Exception as error:  # recorded on the row; the batch goes on
                outcomes.append(Failed(f"{row.get('uri', row.get('id'))}: {type(error).__name__}: {error}"))
        return outcomes

    return handler


DECODE_COLUMNS = {
    "decode_ok": "boolean",
    "decode_error": "text",
    "width": "int",
    "height": "int",
    "md5": "text",
    "phash": "bit(144)",
    "phash_bands": "int[]",
    "colorhash": "bit(84)",
}


def decode_row(row: dict) -> dict:
    """Decode one image. A corrupt or too small file is a result (decode_ok false, the error
    naming the file), not a failure: retrying would not change it. A file that cannot be read
    (missing, a mount or the network gone) raises: the row fails and is retried after a backoff,
    so a storage outage on one node does not mark its images undecodable for good."""
    uri = row["uri"]
    result = dict.fromkeys(DECODE_COLUMNS)
    data = read_uri(uri)
    try:
        image = decode_bytes(data)
    except UnidentifiedImageError:
        return result | _refused(f"cannot decode {uri}: not a recognised image format")
    except Exception as error:  # any undecodable file is recorded, whatever the decoder raised
        return result | _refused(f"cannot decode {uri}: {type(error).__name__}: {error}")
    result |= {"width": image.width, "height": image.height, "md5": md5_hex(data)}
    if min(image.size) < MIN_SIDE:
        return result | _refused(f"{uri} is {image.width}x{image.height}, shorter side < {MIN_SIDE}")
    phash = perceptual_hash(image)
    return result | {"decode_ok": True, "phash": phash, "phash_bands": phash_bands(phash), "colorhash": color_hash(image)}


def _refused(error: str) -> dict:
    return {"decode_ok": False, "decode_error": error}


def filters_row(row: dict) -> dict:
    return quality_scores(open_rgb(row["uri"]))


# The near-duplicate lookup goes through the GIN index of phash bands: the candidates sharing a
# band, fenced (OFFSET 0) so that the planner cannot turn ``min(id) ... id < b.id`` into a walk of
# the primary key over every earlier image (measured on 3.2M images: 3.9 s an image unfenced,
# 88 ms fenced; the id bound must stay outside the fence, or it is ANDed in as a huge bitmap).
DEDUP_SQL = """
    SELECT b.id, LEAST(
        (SELECT min(o.id) FROM images o
          WHERE o.dataset_id = b.dataset_id AND o.md5 = b.md5 AND o.id < b.id AND o.decode_ok),
        (SELECT min(c.id) FROM (SELECT o.id, o.phash, o.colorhash FROM images o
                                 WHERE o.phash_bands && b.phash_bands AND o.dataset_id = b.dataset_id AND o.decode_ok
                                OFFSET 0) c
          WHERE c.id < b.id AND bit_count(c.phash # b.phash) <= %(phash_max)s
            AND bit_count(c.colorhash # b.colorhash) <= %(color_max)s))
      FROM images b WHERE b.id = ANY(%(ids)s)
"""


def dedup_batch(rows: list[dict], ctx: JobContext) -> list[Outcome]:
    ids = [row["id"] for row in rows]
    params = {"ids": ids, "phash_max": PHASH_MAX_DISTANCE, "color_max": COLOR_MAX_DISTANCE}
    with ctx.store.pool.connection() as conn:
        duplicate_of = dict(conn.execute(DEDUP_SQL, params).fetchall())
    return [Done({"duplicate_of": duplicate_of.get(image_id)}) for image_id in ids]


DECODE = register_job(
    Job("decode", "TRUE", per_row(decode_row), batch_size=16, result_columns=DECODE_COLUMNS)
)
FILTERS = register_job(
    Job(
        "filters",
        "i.decode_ok",
        per_row(filters_row),
        batch_size=16,
        result_columns={"laplacian_var": "real", "rgb_entropy": "real", "white_ratio": "real", "black_ratio": "real"},
    )
)
DEDUP = register_job(
    Job(
        "dedup",
        # every image of the dataset decoded, or given up on (a decode row that died, e.g. a file
        # that crashed its workers each time, never gets decode_ok and must not block the rest).
        # Asked once a statement for each dataset, each stopping at its first undecoded live
        # image (the OFFSET 0s keep the planner from joining every undecoded image of the
        # registry): asked for each image, a 5000-image seed chunk took 28-64 s beside a dataset
        # of 800k undecoded images, 9-18 ms this way.
        "i.decode_ok AND i.dataset_id IN (SELECT ds.id FROM datasets ds WHERE NOT EXISTS ("
        "SELECT 1 FROM images u WHERE u.dataset_id = ds.id AND u.decode_ok IS NULL AND NOT EXISTS ("
        "SELECT 1 FROM job_runs d WHERE d.job = 'decode' AND d.image_id = u.id AND d.state = 'dead' OFFSET 0) OFFSET 0))",
        dedup_batch,
        batch_size=256,
        image_columns=("id", "dataset_id"),
        result_columns={"duplicate_of": "bigint"},
    )
)


def skip_dedup(store, dataset: str) -> int:
    """Record ``dedup`` as done, no duplicate found, for the decoded images of ``dataset`` it has
    not judged: for a source known to hold no duplicates whose plain images the perceptual hash
    would merge (the shapes world). Selections need every image judged. Returns the rows added."""
    with store.pool.connection() as conn:
        dataset_id = find_dataset_id(conn, dataset)
        return conn.execute(
            "INSERT INTO job_runs (job, image_id, state, result) SELECT %s, i.id, 'done', %s FROM images i"
            " WHERE i.dataset_id = %s AND i.decode_ok ON CONFLICT DO NOTHING",
            (DEDUP.name, Jsonb({"skipped": "no duplicates in this source"}), dataset_id),
        ).rowcount


def load_jobs() -> list[str]:
    """Import the jobs that live outside this module (those not yet present are skipped)."""
    for module_name in PLUGIN_MODULES:
        try:
            importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
    return registered_jobs()
