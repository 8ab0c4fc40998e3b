-- Dataset registry: one row per dataset, one row per image.
-- Columns written by jobs are nullable: NULL means "not computed yet".

CREATE TABLE datasets (
    id          serial PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (name <> ''),
    source      text,                                   -- what the last ingest read
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE images (
    id              bigserial PRIMARY KEY,
    dataset_id      int NOT NULL REFERENCES datasets (id) ON DELETE CASCADE,
    uri             text NOT NULL,
    -- ingest
    caption_long    text,
    caption_medium  text,
    caption_short   text,
    facts           jsonb,
    ingested_at     timestamptz NOT NULL DEFAULT now(),  -- moves only when ingest changes the row
    -- decode job
    decode_ok       boolean,                             -- NULL: not decoded yet
    decode_error    text,
    width           int,
    height          int,
    md5             text,                                -- of the file's bytes
    phash           bit(144),                            -- 12x12 DCT perceptual hash
    phash_bands     int[],                               -- 12 tagged 12-bit bands of phash (see curate/hashing.py)
    colorhash       bit(84),                             -- thermometer-coded 2x2 mean colour
    -- filters job
    laplacian_var   real,
    rgb_entropy     real,
    white_ratio     real,
    black_ratio     real,
    -- dedup job
    duplicate_of    bigint REFERENCES images (id) ON DELETE SET NULL,
    -- packing (agent L)
    bucket          text,
    UNIQUE (dataset_id, uri)
) WITH (fillfactor = 90);                                -- room for HOT updates of job results

-- The dedup barrier asks "is any image of this dataset still undecoded?".
CREATE INDEX images_undecoded ON images (dataset_id) WHERE decode_ok IS NULL;
CREATE INDEX images_md5 ON images (dataset_id, md5) WHERE md5 IS NOT NULL;
CREATE INDEX images_phash_bands ON images USING gin (phash_bands) WHERE phash_bands IS NOT NULL;
CREATE INDEX images_duplicate_of ON images (duplicate_of) WHERE duplicate_of IS NOT NULL;
