-- The run log (krea2_train.train.runlog): every start, stop and failure of a training run.
-- The run directory's runlog.jsonl is the record; this is its mirror, for queries across runs.

CREATE TABLE run_events (
    id           uuid PRIMARY KEY,    -- the event's id in runlog.jsonl (mirroring is idempotent)
    run          text NOT NULL,       -- run name
    run_dir      text NOT NULL,
    incarnation  int NOT NULL,        -- 1 for the run's first start, +1 per start
    kind         text NOT NULL CHECK (kind IN ('start', 'first_step', 'stop', 'failure')),
    rank         int,
    host         text,
    step         bigint,
    at           timestamptz NOT NULL,
    fields       jsonb NOT NULL DEFAULT '{}'  -- cause, detail, steps_lost, recovery_s, ...
);

CREATE INDEX run_events_by_run ON run_events (run, at);
CREATE INDEX run_events_failures ON run_events (at) WHERE kind = 'failure';
