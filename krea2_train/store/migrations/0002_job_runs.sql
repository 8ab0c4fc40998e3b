-- The processing queue: one small, hot row per (job, image).
-- Bulk metadata stays in `images`; only this table is claimed, heartbeated and reaped.

CREATE TABLE job_runs (
    job               text NOT NULL,
    image_id          bigint NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    state             text NOT NULL DEFAULT 'pending'
                      CHECK (state IN ('pending', 'running', 'done', 'dead')),
    owner             text,            -- host:pid:uuid of the incarnation holding the lease
    attempt           int NOT NULL DEFAULT 0,
    lease_expires_at  timestamptz,
    last_tried_at     timestamptz,     -- NULL first: failed rows go to the back of the queue
    error             text,            -- last error (kept on retry, dead and done-after-retry)
    result            jsonb,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (image_id, job)     -- image_id first: also serves the cascade from images
) WITH (
    fillfactor = 70,                          -- room for HOT updates
    autovacuum_vacuum_scale_factor = 0.01,    -- vacuum after 1% dead rows, not 20%
    autovacuum_vacuum_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0          -- never throttle vacuum on the hot table
);

CREATE INDEX job_runs_claimable ON job_runs (job, last_tried_at NULLS FIRST) WHERE state = 'pending';
CREATE INDEX job_runs_leased ON job_runs (job, lease_expires_at) WHERE state = 'running';
