-- Balanced sampling by hierarchical k-means, and selections (krea2_train/curate/balance.py).

-- One embedding per (image, embedder): float32 little-endian, unit L2 norm.
CREATE TABLE image_embeddings (
    image_id   bigint NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    embedder   text NOT NULL,                 -- e.g. 'small-b4-g4', 'transformers:siglip:/models/x'
    dim        int NOT NULL CHECK (dim > 0),
    embedding  bytea NOT NULL CHECK (length(embedding) = 4 * dim),
    PRIMARY KEY (image_id, embedder)
);

-- One hierarchical clustering of a dataset's selectable images.
CREATE TABLE clusterings (
    id              serial PRIMARY KEY,
    dataset_id      int NOT NULL REFERENCES datasets (id) ON DELETE CASCADE,
    embedder        text NOT NULL,
    images_sha256   text NOT NULL,            -- of the sorted image ids clustered
    settings        jsonb NOT NULL,           -- levels, resampling, iterations, seed
    num_levels      int NOT NULL CHECK (num_levels > 0),
    num_images      int NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (dataset_id, embedder, images_sha256, settings)
);

-- The cluster of each image at every level (cluster_ids[1] = level 1, the finest).
CREATE TABLE image_clusters (
    clustering_id      int NOT NULL REFERENCES clusterings (id) ON DELETE CASCADE,
    image_id           bigint NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    cluster_ids        int[] NOT NULL,
    centroid_distance  real NOT NULL,         -- squared L2 distance to its level-1 centroid
    PRIMARY KEY (clustering_id, image_id)
);
-- "Which images are in cluster c of level l": WHERE cluster_ids[l] = c.
CREATE INDEX image_clusters_level1 ON image_clusters (clustering_id, (cluster_ids[1]));

-- Centroids and sizes per level, for naming and reviewing clusters.
CREATE TABLE cluster_centroids (
    clustering_id  int NOT NULL REFERENCES clusterings (id) ON DELETE CASCADE,
    level          int NOT NULL CHECK (level > 0),
    cluster_id     int NOT NULL,
    num_images     int NOT NULL,              -- images under this cluster
    centroid       bytea NOT NULL,            -- float32 little-endian
    PRIMARY KEY (clustering_id, level, cluster_id)
);

-- A derived dataset chosen from another: its images rows point at the same URIs and captions.
CREATE TABLE selections (
    dataset_id         int PRIMARY KEY REFERENCES datasets (id) ON DELETE CASCADE,
    source_dataset_id  int NOT NULL REFERENCES datasets (id) ON DELETE CASCADE,
    method             text NOT NULL CHECK (method IN ('balance', 'curate')),
    settings           jsonb NOT NULL,
    clustering_id      int REFERENCES clusterings (id) ON DELETE SET NULL,
    num_images         int NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now()
);
