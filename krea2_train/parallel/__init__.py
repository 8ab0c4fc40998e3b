"""Process groups, device meshes, FSDP2 + TP plans, activation checkpointing, compile, grad clipping."""

from krea2_train.parallel.distributed import DistInfo, destroy_distributed, init_distributed
from krea2_train.parallel.grads import all_ranks_finite, clip_grad_norm_, total_grad_norm
from krea2_train.parallel.mesh import build_parallel_dims, data_parallel_rank_size, fsdp_mesh, tp_mesh
from krea2_train.parallel.parallelize import parallelize_dit, shard_frozen_module

__all__ = [
    "DistInfo",
    "all_ranks_finite",
    "build_parallel_dims",
    "clip_grad_norm_",
    "data_parallel_rank_size",
    "destroy_distributed",
    "fsdp_mesh",
    "init_distributed",
    "parallelize_dit",
    "shard_frozen_module",
    "total_grad_norm",
    "tp_mesh",
]
