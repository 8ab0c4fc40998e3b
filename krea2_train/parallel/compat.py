"""The one place for torch / torchtitan shims (CPU-only machines, torch 2.11 vs 2.13).

Every shim is a no-op where it is not needed, so importing this module on a GPU machine changes
nothing:

- torchtitan picks its mesh device type once, at import, as ``torch._utils._get_available_device_type()
  or "cuda"``: on a machine without an accelerator that is "cuda", and every mesh it builds fails.
  :func:`ensure_torchtitan_device_type` points it at "cpu" only when no accelerator exists.
- torchtitan's ``ParallelDims`` backs size-1 mesh axes with the "fake" process-group backend. torch
  2.13 lists it in ``Backend.backend_list`` but only registers its constructor when
  ``torch.testing._internal.distributed.fake_pg`` is imported (torch 2.11 likewise):
  :func:`ensure_fake_backend` does that.
- torchtitan 0.3.0 changes collective timeouts with ``torch.distributed.set_timeout``, which neither
  torch 2.11 nor 2.13 has; :func:`set_collective_timeout` uses ``_set_pg_timeout`` (present in both)
  on every process group, so sub-groups created by a device mesh get the same timeout as the world.
"""

from __future__ import annotations

import functools
from datetime import timedelta

import torch
import torch.distributed as dist
from torch._utils import _get_available_device_type

__all__ = [
    "accelerator_type",
    "ensure_fake_backend",
    "ensure_torchtitan_device_type",
    "mesh_device_type",
    "set_collective_timeout",
    "world_collective_timeout",
]


def accelerator_type() -> str | None:
    """The accelerator torch sees ("cuda", "xpu", ...), or None on a CPU-only machine."""
    return _get_available_device_type()


def mesh_device_type() -> str:
    """Device type for device meshes: the accelerator's, else "cpu"."""
    return accelerator_type() or "cpu"


@functools.cache
def ensure_fake_backend() -> None:
    """Register the "fake" process-group backend that torchtitan uses for size-1 mesh axes."""
    import torch.testing._internal.distributed.fake_pg  # noqa: F401  (registers on import)


@functools.cache
def ensure_torchtitan_device_type() -> None:
    """Make torchtitan build meshes on "cpu" when there is no accelerator (else leave it alone)."""
    if accelerator_type() is not None:
        return
    import torchtitan.distributed.parallel_dims as titan_parallel_dims

    titan_parallel_dims.device_type = "cpu"


def set_collective_timeout(timeout: timedelta) -> None:
    """Set ``timeout`` on every process group of this process (the world and all mesh sub-groups).

    Groups of other backends (e.g. "fake") are left alone; ``_set_pg_timeout`` only knows gloo and nccl.
    """
    from torch.distributed.distributed_c10d import _set_pg_timeout, _world

    for group in list(_world.pg_map):
        backend = str(dist.get_backend(group))
        if "gloo" in backend or "nccl" in backend:
            _set_pg_timeout(timeout, group)


def world_collective_timeout() -> timedelta:
    """The collective timeout the default process group was created with."""
    from torch.distributed.distributed_c10d import _get_default_group

    group = _get_default_group()
    device = torch.device(mesh_device_type())
    return group._get_backend(device).options._timeout
