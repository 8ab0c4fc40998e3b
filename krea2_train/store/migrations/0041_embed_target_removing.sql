-- Removing an embed target sends the rows it killed (dead) back to pending, in chunks. The
-- target is marked removing first (the embed job no longer uses it) and deleted after the last
-- chunk, so removing it again (the command was cut short) finishes the requeue instead of finding
-- no target and leaving the rest of its dead rows dead.
ALTER TABLE embed_targets ADD COLUMN removing boolean NOT NULL DEFAULT false;
