"""Process-group setup from torchrun's environment (or a lone process without one).

gloo on CPU, nccl on CUDA (one device per local rank, ``cuda:{LOCAL_RANK}``). The collective
timeout is always set explicitly: the Krea 2 report names silent collective hangs as a main
failure mode, so a hang must end the job within a known time for the launcher to requeue it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from krea2_train.parallel.compat import accelerator_type, ensure_fake_backend, set_collective_timeout

__all__ = ["DistInfo", "destroy_distributed", "init_distributed"]

_TORCHRUN_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _read_launch_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's variables; (0, 0, 1) when none is set."""
    present = [key for key in _TORCHRUN_KEYS if key in os.environ]
    if not present:
        return 0, 0, 1
    missing = [key for key in _TORCHRUN_KEYS if key not in os.environ]
    if missing:
        raise RuntimeError(
            f"incomplete distributed environment: {', '.join(present)} set but {', '.join(missing)} missing "
            f"(launch with torchrun, or set none of them for a single process)"
        )
    rank, local_rank, world_size = _env_int("RANK"), _env_int("LOCAL_RANK"), _env_int("WORLD_SIZE")
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    return rank, local_rank, world_size


def _pick_device(local_rank: int) -> torch.device:
    accelerator = accelerator_type()
    if accelerator is None:
        return torch.device("cpu")
    if accelerator != "cuda":
        raise RuntimeError(f"unsupported accelerator {accelerator!r}: krea2_train runs on CUDA or CPU")
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(
            f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
            f"launch at most one process per GPU"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


_excepthook_before_init = None


def init_distributed(timeout_s: float = 600) -> DistInfo:
    """Join (or create) the default process group and return this process's place in it.

    Without torchrun's variables the process forms a world of one (a local TCP store on a free
    port), so device meshes and FSDP2 still work. Idempotent: a second call returns the same info.

    Args:
        timeout_s: collective timeout in seconds, applied to the world group and, through
            :func:`krea2_train.parallel.mesh.build_parallel_dims`, to every mesh sub-group.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    ensure_fake_backend()
    rank, local_rank, world_size = _read_launch_env()
    device = _pick_device(local_rank)
    if not dist.is_initialized():
        global _excepthook_before_init
        _excepthook_before_init = sys.excepthook  # torch wraps it to prefix "[rankN]: " on every init
        timeout = timedelta(seconds=timeout_s)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            store = dist.HashStore()
            dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(
                backend,
                rank=rank,
                world_size=world_size,
                timeout=timeout,
                device_id=device if device.type == "cuda" else None,
            )
        set_collective_timeout(timeout)
    elif dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise RuntimeError(
            f"a process group already exists (rank {dist.get_rank()} of {dist.get_world_size()}) that "
            f"disagrees with the environment (rank {rank} of {world_size})"
        )
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def destroy_distributed() -> None:
    """Tear down every process group (no-op when none exists), and unwrap the exception hook torch
    wrapped at init (a process that trains several stages, like ``krea2 demo``, would otherwise
    prefix its tracebacks once per stage)."""
    global _excepthook_before_init
    if dist.is_initialized():
        dist.destroy_process_group()
    if _excepthook_before_init is not None:
        sys.excepthook, _excepthook_before_init = _excepthook_before_init, None


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (picklable; ``value`` itself without a process group)."""
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value`` in rank order (picklable; ``[value]`` without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def host_barrier(timeout_s: float) -> Callable[[], None]:
    """A barrier over a gloo group with its own ``timeout_s``: for ranks waiting on one rank's long
    host work (rank 0 preparing a dataset on a run's first start: decode, dedup, balance, pack can
    take hours), which the world group's collective timeout would cut short. The waiting ranks
    sleep on the host, not in a device collective. Collective: every rank creates it at the same
    point; a no-op without a process group of more than one rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return lambda: None
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    return lambda: dist.barrier(group=group)


def any_rank_on_host(timeout_s: float) -> Callable[[bool], bool]:
    """A function ``flag -> whether any rank's flag is true``, reduced over a gloo group on the
    host (no device sync in the step). Collective: every rank creates it at the same point and
    calls it the same number of times."""
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))

    def any_rank(flag: bool) -> bool:
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
        return bool(value.item())

    return any_rank
