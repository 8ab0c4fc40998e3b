-- A periodic checkpoint save that failed while the run went on (checkpoint.tolerated_failures):
-- recorded in the run log, and not a failure of the run.

ALTER TABLE run_events
    DROP CONSTRAINT run_events_kind_check,
    ADD CONSTRAINT run_events_kind_check CHECK (kind IN ('start', 'first_step', 'stop', 'failure', 'checkpoint_failed'));
