"""The data-sheet peaks MFU is quoted against: each GPU name finds its own variant's figure."""

import pytest
import torch

from krea2_train.bench import gpu

CUDA = torch.device("cuda")  # a device object only: nothing runs on it


@pytest.mark.parametrize(
    "device_name, tflops",
    [
        ("NVIDIA H200 NVL", 835.5),
        ("NVIDIA H200", 989.4),
        ("NVIDIA GH200 480GB", 989.4),
        ("NVIDIA H100 NVL", 835.5),
        ("NVIDIA H100 PCIe", 756.5),
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
    ],
)
def test_spec_peak_is_the_named_variants_dense_bf16_figure(monkeypatch, device_name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)
    assert gpu.spec_peak_flops(CUDA, torch.bfloat16) == pytest.approx(tflops * 1e12)


def test_no_spec_peak_for_unknown_gpus_other_dtypes_or_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 4090")
    assert gpu.spec_peak_flops(CUDA, torch.bfloat16) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200 NVL")
    assert gpu.spec_peak_flops(CUDA, torch.float32) is None
    assert gpu.spec_peak_flops(torch.device("cpu"), torch.bfloat16) is None
