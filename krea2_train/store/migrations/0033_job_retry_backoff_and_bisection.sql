-- Retries wait, and a batch that killed its worker is split.
--
-- not_before:  a failed or reaped row is not claimed again before this time (jittered
--              exponential backoff), so a brief outage of what a job reads does not use up every
--              attempt within milliseconds.
-- batch_limit: the most rows this row may be claimed with (NULL: the job's batch size). A batch
--              whose lease expired (its worker died: OOM, a segfaulting decoder, a lost node)
--              comes back with half its size as the limit, until the row that kills workers is
--              claimed alone; only a row that expired alone counts towards dead, so the rows
--              claimed with it are not set aside for it.

ALTER TABLE job_runs
    ADD COLUMN not_before timestamptz,
    ADD COLUMN batch_limit int CHECK (batch_limit >= 1);

-- smallest limits first (a bisection in progress finishes first), then never tried, then oldest try
DROP INDEX job_runs_claimable;
CREATE INDEX job_runs_claimable ON job_runs (job, batch_limit, last_tried_at NULLS FIRST) WHERE state = 'pending';
