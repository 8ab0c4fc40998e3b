-- The `embed` job (krea2_train/curate/balance.py): which embedders a dataset's selectable images
-- are embedded with, by as many workers (on GPUs) as the user starts.
CREATE TABLE embed_targets (
    dataset_id  int NOT NULL REFERENCES datasets (id) ON DELETE CASCADE,
    embedder    text NOT NULL,                -- the spec: 'small' or a model directory's absolute path
    PRIMARY KEY (dataset_id, embedder)
);
