"""Hierarchical k-means with resampling and top-down water-filling (krea2_train.curate.kmeans)."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from krea2_train.curate import kmeans
from krea2_train.curate.kmeans import (
    KMeansSettings,
    balanced_sample,
    hierarchical_kmeans,
    nearest_centroids,
    resampled_subset,
    semantic_duplicates,
    water_fill,
)


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """The test machine's cores are shared: one OpenMP thread is faster there, and the same result."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def long_tailed_pool(n=20000, concepts=50, dim=32, zipf=1.3, noise=1.0, seed=0):
    """Points around ``concepts`` Gaussian centres, concept frequencies Zipf-distributed."""
    rng = np.random.default_rng(seed)
    frequencies = 1.0 / np.arange(1, concepts + 1) ** zipf
    labels = rng.choice(concepts, size=n, p=frequencies / frequencies.sum())
    centres = rng.normal(size=(concepts, dim))
    points = centres[labels] + noise * rng.normal(size=(n, dim))
    return points.astype(np.float32), labels


def largest_concept_share(labels, indices):
    return np.bincount(labels[indices]).max() / len(indices)


def test_balanced_sample_halves_the_largest_concepts_share():
    points, labels = long_tailed_pool()
    target = len(points) // 10
    uniform = np.random.default_rng(1).choice(len(points), size=target, replace=False)
    uniform_share = largest_concept_share(labels, uniform)
    assert uniform_share > 0.3  # the head concept dominates a uniform sample

    settings = KMeansSettings(levels=(400, 40), resample_steps=3, points_per_cluster=8, seed=0)
    hierarchy = hierarchical_kmeans(points, settings)
    chosen = balanced_sample(hierarchy.point_clusters, target, seed=0)
    assert len(chosen) == target and len(np.unique(chosen)) == target
    assert largest_concept_share(labels, chosen) <= uniform_share / 2
    # the tail survives: more concepts are represented than in the uniform sample
    assert len(np.unique(labels[chosen])) >= len(np.unique(labels[uniform]))


def test_hierarchy_is_consistent_and_deterministic():
    points, _ = long_tailed_pool(n=3000, concepts=20)
    settings = KMeansSettings(levels=(60, 12, 3), resample_steps=2, points_per_cluster=5, seed=3)
    hierarchy = hierarchical_kmeans(points, settings)
    assert hierarchy.point_clusters.shape == (3000, 3)
    assert [c.shape for c in hierarchy.centroids] == [(60, 32), (12, 32), (3, 32)]
    # a level-1 cluster has exactly one parent at every level above
    for level in (1, 2):
        parents = {}
        for child, parent in hierarchy.point_clusters[:, [level - 1, level]]:
            assert parents.setdefault(child, parent) == parent
    # the stored distance is the squared distance to the point's own level-1 centroid
    own = hierarchy.centroids[0][hierarchy.point_clusters[:, 0]]
    np.testing.assert_allclose(hierarchy.centroid_distances, ((points - own) ** 2).sum(1), rtol=1e-3, atol=1e-3)

    again = hierarchical_kmeans(points, settings)
    np.testing.assert_array_equal(again.point_clusters, hierarchy.point_clusters)
    np.testing.assert_array_equal(
        balanced_sample(again.point_clusters, 500, seed=4), balanced_sample(hierarchy.point_clusters, 500, seed=4)
    )
    assert not np.array_equal(
        balanced_sample(hierarchy.point_clusters, 500, seed=4), balanced_sample(hierarchy.point_clusters, 500, seed=5)
    )


def test_level_one_trains_on_a_sample_and_still_balances(monkeypatch):
    """At scale a k-means run trains on train_points_per_cluster random items per cluster; every
    item is still assigned, and the head concept's share is still halved."""
    points, labels = long_tailed_pool()
    trained_on = []
    kmeans_run = kmeans._kmeans
    monkeypatch.setattr(kmeans, "_kmeans", lambda items, *rest: trained_on.append(len(items)) or kmeans_run(items, *rest))
    settings = KMeansSettings(levels=(400, 40), resample_steps=3, points_per_cluster=8, seed=0, train_points_per_cluster=10)
    hierarchy = hierarchical_kmeans(points, settings)
    assert trained_on[0] == 400 * 10  # level 1's first run: a sample of the 20,000 points
    assert trained_on[4] == 400  # level 2 trains on all of level 1's centroids (fewer than 40 * 10)
    own = hierarchy.centroids[0][hierarchy.point_clusters[:, 0]]
    np.testing.assert_allclose(hierarchy.centroid_distances, ((points - own) ** 2).sum(1), rtol=1e-3, atol=1e-3)
    target = len(points) // 10
    uniform = np.random.default_rng(1).choice(len(points), size=target, replace=False)
    chosen = balanced_sample(hierarchy.point_clusters, target, seed=0)
    assert largest_concept_share(labels, chosen) <= largest_concept_share(labels, uniform) / 2
    again = hierarchical_kmeans(points, settings)
    np.testing.assert_array_equal(again.point_clusters, hierarchy.point_clusters)


def test_nearest_centroid_search_in_batches_and_in_torch_matches_one_faiss_search(monkeypatch):
    rng = np.random.default_rng(0)
    items = rng.normal(size=(5000, 48)).astype(np.float32)
    centroids = rng.normal(size=(300, 48)).astype(np.float32)
    index = faiss.IndexFlatL2(48)
    index.add(centroids)
    expected_distances, expected_ids = index.search(items, 1)
    monkeypatch.setattr(kmeans, "ASSIGN_DISTANCES_BYTES", 4 * 300 * 1024)  # batches of 1024 items
    results = []
    for device in ("cpu", "torch-cpu"):  # the torch path is the GPU's; it runs on the CPU the same
        if device == "torch-cpu":
            monkeypatch.setattr(kmeans, "_faiss_search", lambda centroids: kmeans._torch_search(centroids, "cpu"))
        distances, ids = nearest_centroids(items, centroids)
        assert ids.dtype == np.int64 and distances.dtype == np.float32
        np.testing.assert_array_equal(ids, expected_ids[:, 0])
        np.testing.assert_allclose(distances, expected_distances[:, 0], rtol=1e-4, atol=1e-3)
        results.append(distances)
    np.testing.assert_array_equal(results[0], results[1])  # computed from the vectors, not by the search


def inertia(points, centroids):
    return float(((points[:, None, :] - centroids[None]) ** 2).sum(-1).min(1).sum())


def test_torch_kmeans_the_gpu_path_clusters_as_well_as_faiss_and_repeats_itself():
    """The GPU's k-means (torch), run on the CPU: as tight as faiss's on the same data, the same
    centroids for a seed, an empty cluster refilled, a k of n with one item each."""
    points, _ = long_tailed_pool(n=3000, concepts=20)
    faiss_centroids = kmeans._kmeans(points, 60, 20, seed=1)
    torch_centroids = kmeans._torch_kmeans(points, 60, 20, 1, "cpu")
    assert torch_centroids.shape == (60, 32) and torch_centroids.dtype == np.float32
    assert inertia(points, torch_centroids) <= 1.05 * inertia(points, faiss_centroids)
    np.testing.assert_array_equal(kmeans._torch_kmeans(points, 60, 20, 1, "cpu"), torch_centroids)
    assert not np.array_equal(kmeans._torch_kmeans(points, 60, 20, 2, "cpu"), torch_centroids)
    # three distinct items, five clusters: k-means++ repeats items, and the duplicate centres' clusters
    # empty out; they are refilled with real items, never NaN
    few = np.repeat(np.eye(3, 4, dtype=np.float32), 4, axis=0)
    refilled = kmeans._torch_kmeans(few, 5, 3, 0, "cpu")
    assert np.isfinite(refilled).all() and inertia(few, refilled) == 0.0
    exact = kmeans._torch_kmeans(points[:50], 50, 5, 0, "cpu")
    assert inertia(points[:50], exact) == pytest.approx(0.0, abs=1e-6)


def test_hierarchical_kmeans_on_a_gpu_balances_like_on_the_cpu(monkeypatch):
    """The whole hierarchy through the torch path (k-means and searches), run on the CPU."""
    points, labels = long_tailed_pool()
    monkeypatch.setattr(kmeans, "_kmeans", lambda items, k, niter, seed, device: kmeans._torch_kmeans(items, k, niter, seed, "cpu"))
    monkeypatch.setattr(kmeans, "_faiss_search", lambda centroids: kmeans._torch_search(centroids, "cpu"))
    settings = KMeansSettings(levels=(400, 40), resample_steps=3, points_per_cluster=8, seed=0)
    hierarchy = hierarchical_kmeans(points, settings)
    target = len(points) // 10
    uniform = np.random.default_rng(1).choice(len(points), size=target, replace=False)
    chosen = balanced_sample(hierarchy.point_clusters, target, seed=0)
    assert largest_concept_share(labels, chosen) <= largest_concept_share(labels, uniform) / 2


def brute_force_duplicates(embeddings, clusters, distances, threshold):
    """The definition, item by item: a duplicate has a member of its cluster before it (farther
    from the centroid, or as far and lower index) with cosine similarity >= threshold."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    duplicate = np.zeros(len(embeddings), dtype=bool)
    for j in range(len(embeddings)):
        before = (clusters == clusters[j]) & ((distances > distances[j]) | ((distances == distances[j]) & (np.arange(len(embeddings)) < j)))
        duplicate[j] = bool(before.any() and (unit[before] @ unit[j]).max() >= threshold)
    return duplicate


def test_semantic_dedup_leaves_out_near_duplicates_inside_a_cluster_keeping_the_least_typical(monkeypatch):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(40, 16)).astype(np.float32)
    near = base[:10] + 0.01 * rng.normal(size=(10, 16)).astype(np.float32)  # near-copies of the first 10
    embeddings = np.concatenate([base, near])
    clusters = np.r_[rng.integers(0, 3, 40), rng.integers(0, 3, 10)]
    clusters[40:] = clusters[:10]  # each copy in its original's cluster...
    clusters[49] = (clusters[9] + 1) % 3  # ...but one, in another cluster: not a duplicate there
    distances = rng.random(50).astype(np.float32)
    expected = brute_force_duplicates(embeddings, clusters, distances, 0.99)
    assert expected.sum() == 9  # nine pairs, one member of each left out
    for pair in range(9):  # the member farther from the centroid stays
        farther = pair if distances[pair] > distances[40 + pair] else 40 + pair
        assert not expected[farther] and expected[pair + 40 - farther + pair]
    np.testing.assert_array_equal(semantic_duplicates(embeddings, clusters, distances, 0.99), expected)
    for budget in (4, 4 * 40):  # blocks of one row, and of two or three rows: the same answer
        monkeypatch.setattr(kmeans, "ASSIGN_DISTANCES_BYTES", budget)
        np.testing.assert_array_equal(semantic_duplicates(embeddings, clusters, distances, 0.99), expected)
    assert not semantic_duplicates(embeddings, clusters, distances, 1.0).any()  # no two are identical...
    copies = np.concatenate([embeddings, 3.0 * embeddings[:5]])  # ...but exact copies (to rounding) are
    copy_flags = semantic_duplicates(copies, np.r_[clusters, clusters[:5]], np.r_[distances, distances[:5] / 2], 1.0)
    assert copy_flags.tolist() == [False] * 50 + [True] * 5
    with pytest.raises(ValueError, match=r"cosine similarity in \(0, 1\]"):
        semantic_duplicates(embeddings, clusters, distances, 0.0)


def test_small_datasets_get_at_most_one_cluster_per_item():
    points = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    hierarchy = hierarchical_kmeans(points, KMeansSettings(levels=(64, 8)))
    assert [len(c) for c in hierarchy.centroids] == [5, 5]
    assert sorted(balanced_sample(hierarchy.point_clusters, 5)) == [0, 1, 2, 3, 4]


def test_water_fill_exact_shares():
    rng = np.random.default_rng(0)
    assert water_fill(np.array([1, 5, 10, 20]), 20, rng).tolist() == [1, 5, 7, 7]  # cap 7 fits exactly
    assert water_fill(np.array([1, 5, 10, 20]), 36, rng).tolist() == [1, 5, 10, 20]  # everything
    assert water_fill(np.array([1, 5, 10, 20]), 100, rng).tolist() == [1, 5, 10, 20]
    assert water_fill(np.array([3, 3, 3]), 0, rng).tolist() == [0, 0, 0]
    seen = {tuple(water_fill(np.array([1, 5, 10, 20]), 21, np.random.default_rng(s))) for s in range(20)}
    assert seen == {(1, 5, 8, 7), (1, 5, 7, 8)}  # the one left over goes to a random larger group


def test_water_fill_caps_hold_on_random_cases():
    rng = np.random.default_rng(1)
    for _ in range(200):
        sizes = rng.integers(0, 50, size=rng.integers(1, 12))
        target = int(rng.integers(0, sizes.sum() + 5))
        shares = water_fill(sizes, target, rng)
        assert shares.sum() == min(target, sizes.sum())
        assert (shares <= sizes).all() and (shares >= 0).all()
        unsaturated = shares < sizes
        if unsaturated.any():  # every group not taken whole gets the cap or the cap + 1
            assert shares[unsaturated].min() >= shares.max() - 1


def test_balanced_sample_splits_evenly_top_down():
    # two top clusters (a: 3 leaves of 100, 10, 1 points; b: 1 leaf of 500 points)
    leaves = np.repeat([0, 1, 2, 3], [100, 10, 1, 500])
    tops = np.repeat([0, 0, 0, 1], [100, 10, 1, 500])
    chosen = balanced_sample(np.stack([leaves, tops], axis=1), 100, seed=0)
    assert np.bincount(tops[chosen]).tolist() == [50, 50]
    assert np.bincount(leaves[chosen]).tolist() == [39, 10, 1, 50]


def test_nearest_leaf_pick_takes_points_nearest_the_centroid():
    leaves = np.array([0, 0, 0, 1, 1, 1])
    distances = np.array([3.0, 1.0, 2.0, 0.5, 0.1, 0.9], dtype=np.float32)
    chosen = balanced_sample(leaves[:, None], 2, leaf_pick="nearest", centroid_distances=distances)
    assert chosen.tolist() == [1, 4]


def test_resampled_subset_keeps_the_nearest_members_per_cluster():
    assignment = np.array([0, 0, 0, 1, 1, 2])
    distances = np.array([5.0, 1.0, 3.0, 2.0, 4.0, 9.0])
    assert resampled_subset(distances, assignment, 2).tolist() == [1, 2, 3, 4, 5]
    assert resampled_subset(distances, assignment, 1).tolist() == [1, 3, 5]


def test_bad_input_is_named():
    points = np.zeros((10, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="bottom-up"):
        KMeansSettings(levels=(4, 8))
    with pytest.raises(ValueError, match="positive cluster counts"):
        KMeansSettings(levels=())
    with pytest.raises(ValueError, match="train_points_per_cluster >= 1"):
        KMeansSettings(train_points_per_cluster=0)
    with pytest.raises(ValueError, match="NaN"):
        hierarchical_kmeans(np.full((4, 2), np.nan, dtype=np.float32), KMeansSettings(levels=(2,)))
    with pytest.raises(ValueError, match=r"target must be in 1\.\.10"):
        balanced_sample(np.zeros((10, 1), dtype=np.int64), 11)
    with pytest.raises(ValueError, match="needs centroid_distances"):
        balanced_sample(np.zeros((10, 1), dtype=np.int64), 3, leaf_pick="nearest")
    with pytest.raises(ValueError, match="non-negative"):
        water_fill(np.array([1, -1]), 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        hierarchical_kmeans(points[0], KMeansSettings(levels=(2,)))
