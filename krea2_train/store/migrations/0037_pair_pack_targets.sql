-- Pack targets per kind of shard: where and how a dataset's preference pairs are packed at a
-- resolution (krea2_train/data/pairs.py), next to its images'. The pack job reads 'images' targets only.
ALTER TABLE pack_targets ADD COLUMN kind text NOT NULL DEFAULT 'images' CHECK (kind IN ('images', 'pairs'));
ALTER TABLE pack_targets DROP CONSTRAINT pack_targets_pkey;
ALTER TABLE pack_targets ADD PRIMARY KEY (dataset_id, resolution, kind);
