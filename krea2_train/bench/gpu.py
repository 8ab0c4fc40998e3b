"""Denominators for MFU: the device's dense matmul rate, measured and (for known GPUs) specified.

MFU is usually quoted against the vendor's dense peak (H100 SXM: 989 TFLOP/s bf16), which no
kernel reaches; the measured rate of a large square matmul in the same dtype is what the hardware
actually delivers here, so the benchmark reports both. On CPU there is no vendor figure and the
measured fp32 matmul rate is the denominator.
"""

from __future__ import annotations

import time

import torch

__all__ = ["measured_matmul_flops", "spec_peak_flops", "synchronize"]

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, from the vendors' data sheets (half the
# "with sparsity" figure). A device name matches its longest key, so a variant ("H200 NVL") is
# found before its family ("H200", the SXM part).
SPEC_BF16_DENSE_FLOPS: dict[str, float] = {
    "H100 SXM": 989.4e12,
    "H100 80GB HBM3": 989.4e12,
    "H100 NVL": 835.5e12,
    "H100 PCIe": 756.5e12,
    "H200": 989.4e12,
    "H200 NVL": 835.5e12,
    "GH200": 989.4e12,
    "A100": 312e12,
}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU, where every op is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spec_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The data-sheet dense peak of a known NVIDIA GPU in bf16, else None (CPU, other dtypes, unknown GPUs)."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    matches = [key for key in SPEC_BF16_DENSE_FLOPS if key in name]
    return SPEC_BF16_DENSE_FLOPS[max(matches, key=len)] if matches else None


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 10) -> float:
    """FLOP/s of a square ``size x size`` matmul in ``dtype`` on ``device``, best of ``repeats`` timed batches.

    ``size`` defaults to 8192 on GPU (large enough to saturate tensor cores) and 1024 on CPU.
    """
    size = size or (8192 if device.type == "cuda" else 1024)
    generator = torch.Generator(device=device).manual_seed(0)
    left = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    right = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    per_batch = 4 if device.type == "cuda" else 1
    torch.matmul(left, right)  # warm-up: library selection, lazy initialisation
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(per_batch):
            torch.matmul(left, right)
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / per_batch)
    return 2 * size**3 / best
