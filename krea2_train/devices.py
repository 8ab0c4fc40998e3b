"""Copying host tensors to the training device without a host sync.

A copy from pageable host memory to a CUDA device is synchronous: the host waits until the
device has finished everything queued before it (``cudaStreamSynchronize``), which ends the
overlap of host and device work in a step. A copy from page-locked memory with ``non_blocking``
is queued like a kernel instead. The trainer's step has one intended sync (the step values'
all-reduce, ``train.trainer.reduce_step_values``); everything the step moves from the host
(keyed noise, timesteps, tokens, signal flags) goes through :func:`to_device`.
"""

from __future__ import annotations

import torch


def compute_precision(mixed_precision: str, device_type: str | None = None) -> str:
    """``parallel.mixed_precision`` resolved to "bf16" or "fp32": "auto" is bf16 on a CUDA device
    (``device_type`` None: when CUDA is available), fp32 elsewhere."""
    if mixed_precision != "auto":
        return mixed_precision
    on_cuda = torch.cuda.is_available() if device_type is None else device_type == "cuda"
    return "bf16" if on_cuda else "fp32"


def to_device(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor`` on ``device`` (and in ``dtype``): a host tensor bound for CUDA is pinned and
    copied asynchronously; anything else is a plain ``.to``."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, dtype, non_blocking=True)
    return tensor.to(device, dtype)
