import math

import pytest

from workers import hardware
from workers.bench import run_benchmark


def test_detect_hardware_has_the_protocol_shape():
    import torch

    hw = hardware.detect_hardware()
    assert set(hw) == {"gpus", "cpu_count", "memory_mb", "torch", "cuda"}
    assert isinstance(hw["cpu_count"], int) and hw["cpu_count"] >= 1
    assert isinstance(hw["memory_mb"], int) and hw["memory_mb"] > 0
    assert hw["torch"] == torch.__version__
    if torch.cuda.is_available():
        assert len(hw["gpus"]) == torch.cuda.device_count()
        assert all(g["memory_mb"] > 0 and g["name"] for g in hw["gpus"])
        assert hw["cuda"] == torch.version.cuda
    else:
        assert hw["gpus"] == [] and hw["cuda"] is None


def test_gpu_list_parsing():
    assert hardware.parse_gpu_list(None) is None
    assert hardware.parse_gpu_list("") is None
    assert hardware.parse_gpu_list("1, 0,1") == [1, 0]
    with pytest.raises(hardware.DeviceError, match="indices"):
        hardware.parse_gpu_list("0,gpu1")


def test_device_choice():
    assert hardware.choose_device(gpus=None, allow_cpu=False, cuda_count=2) == "cuda:0"
    assert hardware.choose_device(gpus=[1, 0], allow_cpu=False, cuda_count=2) == "cuda:1"
    assert hardware.choose_device(gpus=None, allow_cpu=True, cuda_count=0) == "cpu"
    with pytest.raises(hardware.DeviceError, match="--allow-cpu"):
        hardware.choose_device(gpus=None, allow_cpu=False, cuda_count=0)
    with pytest.raises(hardware.DeviceError, match="GPU 2"):
        hardware.choose_device(gpus=[2], allow_cpu=True, cuda_count=2)


def test_busy_reason_uses_cpu_load_and_other_gpu_processes(monkeypatch):
    monkeypatch.setattr(hardware.psutil, "cpu_percent", lambda interval: 80.0)
    monkeypatch.setattr(hardware, "gpu_processes", lambda: [])
    assert "CPU busy (80%" in hardware.busy_reason(cpu_threshold=30)
    monkeypatch.setattr(hardware.psutil, "cpu_percent", lambda interval: 5.0)
    assert hardware.busy_reason(cpu_threshold=30) is None
    monkeypatch.setattr(hardware, "gpu_processes", lambda: [4242])
    assert "4242" in hardware.busy_reason(cpu_threshold=30)
    monkeypatch.setattr(hardware, "gpu_processes", lambda: None)  # unknown: only the CPU counts
    assert hardware.busy_reason(cpu_threshold=30) is None


def test_benchmark_returns_positive_finite_figures():
    result = run_benchmark("cpu", matmul_size=64, copy_mb=1, repeats=3, budget_s=0.2)
    for key in ("tflops", "mem_gbps"):
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0
    assert result["device"] == "cpu" and result["matmul_size"] == 64
