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


def to_device(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor`` on ``device`` (and in ``dtype``): a host tensor bound for CUDA is pinned and
    copied asynchronously; anything else is a plain ``.to``."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, dtype, non_blocking=True)
    return tensor.to(device, dtype)
