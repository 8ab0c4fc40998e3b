"""Hierarchical k-means with resampling, and balanced sampling by top-down water-filling.

The method of Vo et al. 2024 ("Automatic data curation for self-supervised learning", arXiv
2405.15613), implemented from its description:

- Bottom-up clustering: level 1 clusters the embeddings, level t clusters the centroids of
  level t-1. Each level starts from k-means++ and then takes a few resampling steps: keep the
  ``points_per_cluster`` members nearest each centroid, re-run k-means (k-means++ again) on their
  union and reassign every item. Plain k-means spends its centroids on dense
  regions; resampling spreads them over concepts.
- Semantic dedup inside leaf clusters (SemDeDup, Abbas et al. 2023, arXiv 2303.09540), optional:
  within each level-1 cluster, an item whose cosine similarity to an item before it, in the order
  farthest-from-the-centroid first, reaches a threshold is a near-duplicate and is not sampled. Of
  a group of near-duplicates the least typical one stays.
- Top-down sampling of a target size T: give the top-level clusters a share each by
  water-filling (the largest cap x with sum(min(x, size_i)) <= T; every cluster gets
  min(x, size_i); the remainder goes one each to random clusters larger than x), then split each
  cluster's share among its sub-clusters the same way, down to level 1, where members are picked
  at random or nearest the centroid.

At scale (tens of millions of embeddings, tens of thousands of level-1 clusters) the cost is the
level-1 runs: a level's first k-means run trains on at most ``train_points_per_cluster`` random
items per cluster (faiss's own default is 256; the resampling runs train on their subset), and
every item is then assigned to its nearest centroid in batches, with progress logged. With a GPU
(``device="cuda"``) both the k-means runs and the searches run there in torch; on the CPU, faiss.

Everything is a pure function of its inputs, a seed and the device. Numpy in, numpy out.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from krea2_train.logs import Progress, format_duration

logger = logging.getLogger(__name__)

LEAF_PICKS = ("random", "nearest")
ASSIGN_DISTANCES_BYTES = 1 << 28  # one batch's [items, centroids] float32 distances in a nearest-centroid search
SIMILARITY_TOLERANCE = 1e-6


@dataclass(frozen=True)
class KMeansSettings:
    """How each level is clustered.

    Attributes:
        levels: clusters per level, bottom-up (level 1 first); each no larger than the one below.
        resample_steps: resampling steps after the k-means++ run of each level.
        points_per_cluster: members per cluster, nearest its centroid, kept by a resampling step.
        niter: k-means iterations of each run.
        seed: the seed of every random choice.
        train_points_per_cluster: a level's first k-means run (k clusters) trains on at most k
            times this many of its items, drawn at random (the resampling runs train on their
            subset; every item is still assigned to its nearest centroid).
    """

    levels: tuple[int, ...] = (64, 8)
    resample_steps: int = 3
    points_per_cluster: int = 8
    niter: int = 20
    seed: int = 0
    train_points_per_cluster: int = 256

    def __post_init__(self):
        if not self.levels or any(k < 1 for k in self.levels):
            raise ValueError(f"levels must be a non-empty list of positive cluster counts, got {list(self.levels)}")
        if any(upper > lower for lower, upper in zip(self.levels, self.levels[1:])):
            raise ValueError(f"levels are bottom-up: each must be <= the one below it, got {list(self.levels)}")
        if self.resample_steps < 0 or self.points_per_cluster < 1 or self.niter < 1 or self.train_points_per_cluster < 1:
            raise ValueError(
                "resample_steps must be >= 0 and points_per_cluster, niter, train_points_per_cluster >= 1, got"
                f" {self.resample_steps}, {self.points_per_cluster}, {self.niter}, {self.train_points_per_cluster}"
            )

    def to_json(self) -> dict:
        return {
            "levels": list(self.levels),
            "resample_steps": self.resample_steps,
            "points_per_cluster": self.points_per_cluster,
            "niter": self.niter,
            "seed": self.seed,
            "train_points_per_cluster": self.train_points_per_cluster,
        }


@dataclass(frozen=True)
class Hierarchy:
    """A bottom-up clustering of n points.

    Attributes:
        point_clusters: [n, L] int64, the cluster of each point at each level (column 0 = level 1).
        centroids: per level, [k_l, d] float32.
        centroid_distances: [n] float32, squared distance of each point to its level-1 centroid.
    """

    point_clusters: np.ndarray
    centroids: tuple[np.ndarray, ...]
    centroid_distances: np.ndarray

    @property
    def num_levels(self) -> int:
        return self.point_clusters.shape[1]


def nearest_centroids(items: np.ndarray, centroids: np.ndarray, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Exact nearest centroid of each item, in batches (progress logged, see :class:`~krea2_train.logs.Progress`).

    Args:
        items: [n, d] float32.
        centroids: [k, d] float32.
        device: ``"cpu"`` for faiss, or a torch device (``"cuda"``) to search there in full fp32.
    Returns:
        squared distances [n] float32 (computed exactly from the two vectors) and centroid ids
        [n] int64. faiss and torch may choose differently between two centroids at the same
        distance to within rounding; nothing else about the result depends on the device.
    """
    n, k = len(items), len(centroids)
    batch = max(1024, ASSIGN_DISTANCES_BYTES // (4 * max(k, items.shape[1])))  # [batch, k] distances, [batch, d] items
    search = _faiss_search(centroids) if device == "cpu" else _torch_search(centroids, device)
    distances, ids = np.empty(n, dtype=np.float32), np.empty(n, dtype=np.int64)
    progress = Progress(f"assigned to {k} centroids:", n, "items", logger)
    for start in range(0, n, batch):
        end = min(start + batch, n)
        block = np.ascontiguousarray(items[start:end], dtype=np.float32)
        ids[start:end] = search(block)
        # the distance to the chosen centroid, exactly (float64): the same on every device, where
        # the searches' own |x|^2 - 2 x.c + |c|^2 differ in the last bits (they drive resampling,
        # nearest leaf picks and the semantic dedup order)
        distances[start:end] = np.square(block - centroids[ids[start:end]], dtype=np.float64).sum(1)
        progress.update(end)
    return distances, ids


def _faiss_search(centroids: np.ndarray):
    import faiss  # here, not at the top: training imports this module and never clusters

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))

    def search(items: np.ndarray) -> np.ndarray:
        return index.search(items, 1)[1][:, 0]

    return search


@contextmanager
def full_fp32_matmuls():
    """CUDA fp32 matmuls in full precision inside (no TF32, whatever the process set), restored
    after; through torch's per-backend setting where it has one (2.9+: reading the legacy one
    after the new one was set is an error)."""
    import torch

    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        before = matmul.fp32_precision
        matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = before
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _squared_distances(items, item_norms, centroids, centroid_norms):
    """|x - c|^2 as |x|^2 - 2 x.c + |c|^2 (as faiss computes it), clamped at 0: torch items [n, d]
    with norms [n], centroids [k, d] with norms [k] -> [n, k]. Call it inside :func:`full_fp32_matmuls`."""
    return (item_norms[:, None] - 2 * items @ centroids.T + centroid_norms).clamp_min(0)


def _torch_search(centroids: np.ndarray, device: str):
    """Nearest centroids by :func:`_squared_distances`, the matmul in full fp32 (no TF32)."""
    import torch

    centroids_t = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(device)
    centroid_norms = centroids_t.square().sum(1)

    def search(items: np.ndarray) -> np.ndarray:
        with full_fp32_matmuls():
            items_t = torch.from_numpy(items).to(device)
            squared = _squared_distances(items_t, items_t.square().sum(1), centroids_t, centroid_norms)
        return squared.argmin(1).cpu().numpy()

    return search


def _kmeans(items: np.ndarray, k: int, niter: int, seed: int, device: str = "cpu") -> np.ndarray:
    """k-means centroids [k, d] of ``items`` [n, d], from a k-means++ start: faiss on the CPU,
    :func:`_torch_kmeans` on a torch device (``"cuda"``)."""
    if device != "cpu":
        return _torch_kmeans(items, k, niter, seed, device)
    import faiss

    kmeans = faiss.Kmeans(
        items.shape[1],
        k,
        niter=niter,
        seed=seed,
        init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
        min_points_per_centroid=1,
        max_points_per_centroid=max(256, -(-len(items) // k)),  # never subsample
    )
    kmeans.train(items)
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


def _torch_kmeans(items: np.ndarray, k: int, niter: int, seed: int, device: str) -> np.ndarray:
    """k-means in torch on ``device``, every matmul in full fp32: centroids [k, d] of ``items`` [n, d].

    k-means++ seeding (the first centre uniform, each next drawn with probability proportional to
    the squared distance to the nearest centre so far; the uniform draws are made on the host from
    ``seed``), then ``niter`` Lloyd iterations. A cluster's new centroid is the mean of its items,
    summed as one-hot matmuls (no atomic adds), so a seed gives the same centroids on a device
    every time. A cluster left empty takes the item farthest from its own centroid. Items go
    through in batches of at most ``ASSIGN_DISTANCES_BYTES`` of distances.
    """
    import torch

    draws = np.random.default_rng(seed).random(k)
    x = torch.from_numpy(np.ascontiguousarray(items, dtype=np.float32)).to(device)
    n, d = x.shape
    norms = x.square().sum(1)
    batch = max(1024, ASSIGN_DISTANCES_BYTES // (4 * max(k, d)))
    with full_fp32_matmuls():
        centroids = torch.empty(k, d, device=x.device)
        chosen = min(int(draws[0] * n), n - 1)
        centroids[0] = x[chosen]
        to_item = lambda index: _squared_distances(x, norms, x[index : index + 1], norms[index : index + 1])[:, 0]  # noqa: E731
        closest = to_item(chosen)  # [n] squared distance to the nearest centre so far
        for j in range(1, k):
            cumulative = closest.double().cumsum(0)
            total = float(cumulative[-1])
            if total > 0:
                chosen = min(int(torch.searchsorted(cumulative, torch.tensor([draws[j] * total], dtype=torch.float64, device=x.device))), n - 1)
            else:  # every item sits on a centre already: any item will do
                chosen = min(int(draws[j] * n), n - 1)
            centroids[j] = x[chosen]
            closest = torch.minimum(closest, to_item(chosen))
        for _ in range(niter):
            sums, counts = torch.zeros(k, d, device=x.device), torch.zeros(k, device=x.device)
            assignment, distance = torch.empty(n, dtype=torch.int64, device=x.device), torch.empty(n, device=x.device)
            centroid_norms = centroids.square().sum(1)
            for start in range(0, n, batch):
                block = x[start : start + batch]
                squared = _squared_distances(block, norms[start : start + batch], centroids, centroid_norms)
                distance[start : start + batch], assignment[start : start + batch] = squared.min(1)
                one_hot = torch.nn.functional.one_hot(assignment[start : start + batch], k).to(x.dtype)  # [b, k]
                sums += one_hot.T @ block
                counts += one_hot.sum(0)
            empty = torch.nonzero(counts == 0).flatten()
            centroids = sums / counts.clamp_min(1)[:, None]
            if len(empty):
                centroids[empty] = x[distance.topk(min(len(empty), n)).indices[: len(empty)]]
    return centroids.cpu().numpy()


def resampled_subset(distances: np.ndarray, assignment: np.ndarray, points_per_cluster: int) -> np.ndarray:
    """Indices of the ``points_per_cluster`` items nearest their centroid in every cluster
    (all of a smaller cluster's items), sorted."""
    order = np.lexsort((np.arange(len(distances)), distances, assignment))
    sorted_clusters = assignment[order]
    first_of_cluster = np.searchsorted(sorted_clusters, sorted_clusters, side="left")
    rank_in_cluster = np.arange(len(order)) - first_of_cluster
    return np.sort(order[rank_in_cluster < points_per_cluster])


def cluster_level(
    items: np.ndarray, k: int, settings: KMeansSettings, level_seed: int, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One level: k-means++ (trained on at most ``k * train_points_per_cluster`` random items) and
    the resampling steps; every run trains, and its centroids are searched by all items, on
    ``device`` (faiss on ``"cpu"``, torch on a GPU).

    Args:
        items: [n, d] float32 (n >= k).
    Returns:
        centroids [k, d], assignment [n] and squared distances [n] to the assigned centroid.
    """
    began = time.monotonic()
    train = items
    if len(items) > k * settings.train_points_per_cluster:
        rng = np.random.default_rng(level_seed)
        train = items[np.sort(rng.choice(len(items), k * settings.train_points_per_cluster, replace=False))]
    centroids = _kmeans(train, k, settings.niter, level_seed, device)
    del train
    distances, assignment = nearest_centroids(items, centroids, device)
    for step in range(settings.resample_steps):
        subset = resampled_subset(distances, assignment, settings.points_per_cluster)
        if len(subset) < k:
            break
        centroids = _kmeans(items[subset], k, settings.niter, level_seed + 1 + step, device)
        distances, assignment = nearest_centroids(items, centroids, device)
    logger.info("clustered %d items into %d clusters in %s", len(items), k, format_duration(time.monotonic() - began))
    return centroids, assignment, distances


def hierarchical_kmeans(embeddings: np.ndarray, settings: KMeansSettings, device: str = "cpu") -> Hierarchy:
    """Bottom-up hierarchical k-means of ``embeddings`` [n, d]; nearest-centroid searches run on
    ``device`` (see :func:`nearest_centroids`).

    A level never asks for more clusters than it has items (a small dataset gets fewer clusters).
    """
    items = np.ascontiguousarray(embeddings, dtype=np.float32)
    if items.ndim != 2 or len(items) == 0:
        raise ValueError(f"embeddings must be a non-empty [n, d] array, got shape {embeddings.shape}")
    rows = max(1, ASSIGN_DISTANCES_BYTES // (4 * items.shape[1]))  # a bounded mask per check, not [n, d] at once
    if not all(np.isfinite(items[start : start + rows]).all() for start in range(0, len(items), rows)):
        raise ValueError("embeddings contain NaN or infinite values")
    point_clusters = np.empty((len(items), len(settings.levels)), dtype=np.int64)
    all_centroids = []
    point_distances = None
    parent_of_point = np.arange(len(items))
    for level, k in enumerate(settings.levels):
        k = min(k, len(items))
        centroids, assignment, distances = cluster_level(items, k, settings, settings.seed * 1000 + level * 100, device)
        if point_distances is None:
            point_distances = distances
        parent_of_point = assignment[parent_of_point]
        point_clusters[:, level] = parent_of_point
        all_centroids.append(centroids)
        items = centroids
    return Hierarchy(point_clusters, tuple(all_centroids), point_distances.astype(np.float32))


def check_similarity_threshold(threshold: float) -> None:
    """Raise ValueError unless ``threshold`` is a cosine similarity in (0, 1] (NaN is not)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"the semantic dedup threshold must be a cosine similarity in (0, 1], got {threshold}")


def semantic_duplicates(
    embeddings: np.ndarray, leaf_clusters: np.ndarray, centroid_distances: np.ndarray, threshold: float, device: str = "cpu"
) -> np.ndarray:
    """Near-duplicates inside each leaf (level-1) cluster: [n] bool, True for the items to leave out.

    In each cluster, members are ordered farthest from the centroid first (ties by index); a member
    is a duplicate when its cosine similarity to any member before it is at least ``threshold``
    (less ``SIMILARITY_TOLERANCE``: two copies of one vector are 1 only to within rounding).
    Similarities are computed in torch on ``device``, a block of rows against the members before
    them at a time (at most ``ASSIGN_DISTANCES_BYTES`` of similarities): a cluster of m members
    costs at most m^2 d multiply-adds, and a large one never holds an [m, m] matrix.

    Args:
        embeddings: [n, d] float32.
        leaf_clusters: [n] int, the level-1 cluster of each item.
        centroid_distances: [n], each item's distance to its level-1 centroid.
        threshold: cosine similarity in (0, 1]; 0.95 is SemDeDup's eps = 0.05.
    """
    import torch

    check_similarity_threshold(threshold)
    n = len(embeddings)
    duplicate = np.zeros(n, dtype=bool)
    order = np.lexsort((np.arange(n), -np.asarray(centroid_distances, dtype=np.float64), leaf_clusters))
    starts = np.flatnonzero(np.r_[True, np.diff(np.asarray(leaf_clusters)[order]) != 0])
    progress = Progress("semantic dedup:", n, "items", logger)
    for first, last in zip(starts, np.r_[starts[1:], n]):
        members = order[first:last]
        if len(members) < 2:
            continue
        unit = np.array(embeddings[members], dtype=np.float32)  # a copy, normalised in place on the host
        unit /= np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
        vectors = torch.from_numpy(unit).to(device)
        rows = max(1, ASSIGN_DISTANCES_BYTES // (4 * len(members)))
        for row in range(1, len(members), rows):
            end = min(row + rows, len(members))
            with full_fp32_matmuls():
                similarity = vectors[row:end] @ vectors[:end].T  # [b, end]: row r is member row + r
            later = torch.arange(end, device=device)[None, :] >= torch.arange(row, end, device=device)[:, None]
            similarity.masked_fill_(later, -2.0)  # only the members before each one count
            duplicate[members[row:end]] = (similarity.max(1).values >= threshold - SIMILARITY_TOLERANCE).cpu().numpy()
            progress.update(first + end)  # inside a cluster too: one large cluster can take hours
    return duplicate


def water_fill(sizes: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Shares of ``target`` among groups of ``sizes`` [m]: min(x, size) with the largest cap x
    that fits, plus one each for ``target - sum`` random groups larger than x.

    Returns [m] int64 shares, each <= its size, summing to min(target, sum(sizes)).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if target < 0 or (sizes < 0).any():
        raise ValueError(f"target and sizes must be non-negative, got {target} and {sizes.tolist()}")
    if target >= sizes.sum():
        return sizes.copy()
    low, high = 0, int(sizes.max())  # the cap fits at low, not at high
    while high - low > 1:
        middle = (low + high) // 2
        if np.minimum(sizes, middle).sum() <= target:
            low = middle
        else:
            high = middle
    shares = np.minimum(sizes, low)
    remainder = int(target - shares.sum())
    larger = np.flatnonzero(sizes > low)
    shares[rng.choice(larger, size=remainder, replace=False)] += 1
    return shares


def _pick_leaf(members: np.ndarray, count: int, distances: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    if distances is None:
        return rng.choice(members, size=count, replace=False)
    order = np.lexsort((members, distances[members]))
    return members[order[:count]]


def _sample_group(
    members: np.ndarray, count: int, level: int, point_clusters: np.ndarray,
    distances: np.ndarray | None, rng: np.random.Generator,
) -> list[np.ndarray]:
    if level < 0:
        return [_pick_leaf(members, count, distances, rng)]
    cluster_ids, inverse, sizes = np.unique(point_clusters[members, level], return_inverse=True, return_counts=True)
    shares = water_fill(sizes, count, rng)
    picked = []
    for index in np.flatnonzero(shares):
        sub_members = members[inverse == index]
        picked += _sample_group(sub_members, int(shares[index]), level - 1, point_clusters, distances, rng)
    return picked


def balanced_sample(
    point_clusters: np.ndarray,
    target: int,
    *,
    seed: int = 0,
    leaf_pick: str = "random",
    centroid_distances: np.ndarray | None = None,
) -> np.ndarray:
    """Indices of ``target`` points chosen top-down by water-filling over the hierarchy.

    Args:
        point_clusters: [n, L] cluster ids per level (column 0 = level 1), as ``Hierarchy`` has them.
        target: the sample size, 0 < target <= n.
        leaf_pick: "random", or "nearest" (the members nearest their level-1 centroid, which
            needs ``centroid_distances`` [n]).
    Returns:
        [target] sorted int64 indices into the n points.
    """
    point_clusters = np.asarray(point_clusters)
    if point_clusters.ndim != 2 or point_clusters.shape[1] == 0:
        raise ValueError(f"point_clusters must be [n, levels], got shape {point_clusters.shape}")
    n = len(point_clusters)
    if not 0 < target <= n:
        raise ValueError(f"target must be in 1..{n} (the number of points), got {target}")
    if leaf_pick not in LEAF_PICKS:
        raise ValueError(f"leaf_pick must be one of {LEAF_PICKS}, got {leaf_pick!r}")
    distances = None
    if leaf_pick == "nearest":
        if centroid_distances is None or len(centroid_distances) != n:
            raise ValueError("leaf_pick='nearest' needs centroid_distances, one per point")
        distances = np.asarray(centroid_distances)
    rng = np.random.default_rng(seed)
    top = point_clusters.shape[1] - 1
    picked = _sample_group(np.arange(n), target, top, point_clusters, distances, rng)
    return np.sort(np.concatenate(picked)).astype(np.int64)
