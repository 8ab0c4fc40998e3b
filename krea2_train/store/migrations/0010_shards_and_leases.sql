-- Training shards and the training-read bookkeeping (agent L).
-- The sample order never depends on these tables: they record progress, leases and quarantine.

CREATE TABLE shards (
    id              bigserial PRIMARY KEY,
    dataset_id      int NOT NULL REFERENCES datasets (id) ON DELETE CASCADE,
    resolution      int NOT NULL CHECK (resolution > 0),
    bucket          text NOT NULL,                       -- aspect ratio, e.g. '16:9'
    width           int NOT NULL CHECK (width > 0),
    height          int NOT NULL CHECK (height > 0),
    path            text NOT NULL UNIQUE,
    num_samples     int NOT NULL CHECK (num_samples > 0),
    sha256          text NOT NULL,                       -- of the whole file
    image_format    text NOT NULL,
    state           text NOT NULL DEFAULT 'ready' CHECK (state IN ('ready', 'quarantined')),
    error           text,                                -- why it was quarantined (names the file)
    quarantined_at  timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX shards_ready ON shards (dataset_id, resolution) WHERE state = 'ready';

-- Which shard row holds an image at a resolution: makes packing incremental and idempotent.
CREATE TABLE shard_samples (
    resolution  int NOT NULL,
    image_id    bigint NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    shard_id    bigint NOT NULL REFERENCES shards (id) ON DELETE CASCADE,
    "row"       int NOT NULL,
    PRIMARY KEY (resolution, image_id)
);
CREATE INDEX shard_samples_shard ON shard_samples (shard_id);

-- What the `pack` job packs: one row per (dataset, resolution).
CREATE TABLE pack_targets (
    dataset_id  int NOT NULL REFERENCES datasets (id) ON DELETE CASCADE,
    resolution  int NOT NULL CHECK (resolution > 0),
    out_dir     text NOT NULL,
    settings    jsonb NOT NULL,                          -- aspect ratios, pixel multiple, format ...
    PRIMARY KEY (dataset_id, resolution)
);

-- One row per training run reading shards.
CREATE TABLE loader_runs (
    run_id             text PRIMARY KEY,
    manifest_sha256    text NOT NULL,
    num_shards         int NOT NULL,
    num_samples        bigint NOT NULL,
    batches_per_epoch  bigint NOT NULL CHECK (batches_per_epoch > 0),
    global_batch_size  int NOT NULL,
    world_size         int NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);

-- One row per rank: the rank's lease (owner = host:pid:uuid of the incarnation, attempt bumped by
-- every takeover) and its position. Heartbeats extend expires_at; every write is fenced by
-- (owner, attempt), so a superseded incarnation's writes change 0 rows.
CREATE TABLE loader_ranks (
    run_id        text NOT NULL REFERENCES loader_runs (run_id) ON DELETE CASCADE,
    rank          int NOT NULL CHECK (rank >= 0),
    owner         text NOT NULL,
    attempt       int NOT NULL,
    epoch         int NOT NULL,
    batch_index   bigint NOT NULL,                       -- next global batch the trainer consumes
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    PRIMARY KEY (run_id, rank)
) WITH (fillfactor = 70);

-- Which rank holds which shard in an epoch. A lease is live while its rank's lease is live.
CREATE TABLE shard_leases (
    run_id       text NOT NULL,
    epoch        int NOT NULL,
    rank         int NOT NULL,
    shard_id     bigint NOT NULL REFERENCES shards (id) ON DELETE CASCADE,
    owner        text NOT NULL,
    attempt      int NOT NULL,
    state        text NOT NULL CHECK (state IN ('held', 'done')),
    first_batch  bigint NOT NULL,
    last_batch   bigint NOT NULL,
    leased_at    timestamptz NOT NULL DEFAULT now(),
    done_at      timestamptz,
    PRIMARY KEY (run_id, epoch, rank, shard_id),
    FOREIGN KEY (run_id, rank) REFERENCES loader_ranks (run_id, rank) ON DELETE CASCADE
) WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.02);
CREATE INDEX shard_leases_shard ON shard_leases (shard_id);
