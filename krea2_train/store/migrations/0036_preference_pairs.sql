-- Human preference pairs (STPO's calibration phase, krea2_train/data/pairs.py): two images of one
-- prompt, one preferred. Both are images of the pair's dataset; an image may be in several pairs.
CREATE TABLE preference_pairs (
    id          bigserial PRIMARY KEY,
    dataset_id  int NOT NULL REFERENCES datasets (id) ON DELETE CASCADE,
    prompt      text NOT NULL CHECK (prompt <> ''),
    winner_id   bigint NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    loser_id    bigint NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    CHECK (winner_id <> loser_id),
    UNIQUE (dataset_id, winner_id, loser_id, prompt)
);

-- A shard holds single images (rows in shard_samples) or pairs (rows in shard_pairs): one row
-- is a winner and its loser, resized into one bucket.
ALTER TABLE shards ADD COLUMN kind text NOT NULL DEFAULT 'images' CHECK (kind IN ('images', 'pairs'));

CREATE TABLE shard_pairs (
    resolution  int NOT NULL,
    pair_id     bigint NOT NULL REFERENCES preference_pairs (id) ON DELETE CASCADE,
    shard_id    bigint NOT NULL REFERENCES shards (id) ON DELETE CASCADE,
    "row"       int NOT NULL,
    PRIMARY KEY (resolution, pair_id)
);
CREATE INDEX shard_pairs_shard ON shard_pairs (shard_id);
