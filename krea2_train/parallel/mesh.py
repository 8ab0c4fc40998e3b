"""Device meshes through torchtitan's ``ParallelDims``.

The mesh axes this project uses (world = dp_replicate x dp_shard x tp, in that order, so the TP
ranks of one data-parallel group are neighbours and share a node):

- ``dp_replicate`` x ``fsdp``: FSDP2 / HSDP over data-parallel ranks (``fsdp`` is dp_shard here:
  no context parallelism). The ``fsdp`` axis always exists, even of size 1, so FSDP2 can apply a
  mixed-precision policy on a single rank.
- ``batch``: all data-parallel ranks; the loader reads slice ``rank`` of ``size`` of each global batch.
- ``tp``: tensor parallel; its ranks see the same data.
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torchtitan.distributed import ParallelDims

from krea2_train.parallel.compat import (
    ensure_fake_backend,
    ensure_torchtitan_device_type,
    set_collective_timeout,
    world_collective_timeout,
)

__all__ = ["build_parallel_dims", "data_parallel_rank_size", "fsdp_mesh", "tp_mesh"]


def _resolve_dp_shard(dp_replicate: int, dp_shard: int, tp: int, world_size: int) -> int:
    for name, degree in (("dp_replicate", dp_replicate), ("tp", tp), ("world_size", world_size)):
        if not isinstance(degree, int) or degree < 1:
            raise ValueError(f"{name} must be a positive integer, got {degree!r}")
    if not isinstance(dp_shard, int) or not (dp_shard == -1 or dp_shard >= 1):
        raise ValueError(f"dp_shard must be a positive integer or -1 (the rest of the world), got {dp_shard!r}")
    if dp_shard == -1:
        if world_size % (dp_replicate * tp):
            raise ValueError(
                f"dp_shard=-1 needs world_size ({world_size}) divisible by dp_replicate ({dp_replicate}) "
                f"x tp ({tp})"
            )
        dp_shard = world_size // (dp_replicate * tp)
    if dp_replicate * dp_shard * tp != world_size:
        raise ValueError(
            f"dp_replicate ({dp_replicate}) x dp_shard ({dp_shard}) x tp ({tp}) = "
            f"{dp_replicate * dp_shard * tp}, but world_size is {world_size}"
        )
    return dp_shard


def build_parallel_dims(dp_replicate: int, dp_shard: int, tp: int, world_size: int) -> ParallelDims:
    """Validate the degrees and build every mesh (needs an initialised default process group).

    Args:
        dp_replicate: HSDP replica groups (1 = plain FSDP).
        dp_shard: FSDP shard degree; -1 means ``world_size / (dp_replicate * tp)``.
        tp: tensor-parallel degree.
        world_size: number of processes; must equal the process group's size.
    Returns:
        torchtitan ``ParallelDims`` (``spmd_backend="partial_dtensor"``) with its meshes built; every
        mesh sub-group gets the world group's collective timeout.
    """
    dp_shard = _resolve_dp_shard(dp_replicate, dp_shard, tp, world_size)
    if not dist.is_initialized():
        raise RuntimeError("build_parallel_dims needs a process group: call init_distributed() first")
    if dist.get_world_size() != world_size:
        raise ValueError(f"world_size={world_size} but the process group has {dist.get_world_size()} ranks")
    ensure_fake_backend()
    ensure_torchtitan_device_type()
    parallel_dims = ParallelDims(
        dp_replicate=dp_replicate,
        dp_shard=dp_shard,
        cp=1,
        tp=tp,
        pp=1,
        ep=1,
        world_size=world_size,
        spmd_backend="partial_dtensor",
    )
    parallel_dims.build_mesh()
    set_collective_timeout(world_collective_timeout())
    return parallel_dims


def fsdp_mesh(parallel_dims: ParallelDims) -> DeviceMesh:
    """The FSDP2 mesh: ``("dp_replicate", "fsdp")`` for HSDP, else ``("fsdp",)`` (possibly of size 1)."""
    if parallel_dims.dp_replicate_enabled:
        return parallel_dims.get_mesh(["dp_replicate", "fsdp"])
    return parallel_dims.get_mesh("fsdp")


def tp_mesh(parallel_dims: ParallelDims) -> DeviceMesh | None:
    """The tensor-parallel mesh, or None when tp = 1."""
    return parallel_dims.get_optional_mesh("tp")


def data_parallel_rank_size(parallel_dims: ParallelDims) -> tuple[int, int]:
    """(rank, size) of this process among data-parallel ranks: the loader's shard index and count.

    TP ranks of one data-parallel group get the same rank (they must read the same samples).
    """
    batch_mesh = parallel_dims.get_optional_mesh("batch")
    if batch_mesh is None:
        return 0, 1
    return batch_mesh.get_local_rank(), batch_mesh.size()
