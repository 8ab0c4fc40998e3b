-- A new pack or embed target sends the dataset's finished rows of its job back to pending, in
-- chunks (a 50M-image dataset in one UPDATE outlived statement_timeout). The target row is
-- committed first; requeue_pending stays true until the last chunk is done, so adding the same
-- target again (a restarted run) finishes a requeue that was cut short instead of skipping it.
ALTER TABLE pack_targets ADD COLUMN requeue_pending boolean NOT NULL DEFAULT false;
ALTER TABLE embed_targets ADD COLUMN requeue_pending boolean NOT NULL DEFAULT false;
