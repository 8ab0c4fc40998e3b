-- images.bucket was never written: a packed sample's aspect bucket is shards.bucket (through
-- shard_samples), and an image is packed once per resolution, each with its own bucket.
ALTER TABLE images DROP COLUMN bucket;
