"""A few-second benchmark on the device the agent trains on: matmul TFLOPS and memory bandwidth.

The figures prove roughly what a machine can do (like the self-tests of Vast.ai or Petals' announced
throughput) and help the server pick workers. Both are medians over repeated, timed runs after a warm-up:
on CUDA each run is timed with CUDA events and the stream is synchronised before reading them; on the CPU
with ``time.perf_counter``. The matmul runs in float32, the dtype the inner loop trains in (TF32 is left
at torch's default, off). Bandwidth is measured with ``dst.copy_(src)``: each copy reads and writes the
tensor once, so it moves ``2 × nbytes``.
"""

from __future__ import annotations

import statistics
import time


def _timer(device):
    import torch

    if device.type == "cuda":
        def run(fn) -> float:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1000.0
    else:
        def run(fn) -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return run


def _median_seconds(fn, timer, *, warmup: int, repeats: int, budget_s: float) -> float:
    for _ in range(warmup):
        timer(fn)
    samples = []
    deadline = time.monotonic() + budget_s
    while len(samples) < repeats:
        samples.append(timer(fn))
        if time.monotonic() > deadline and len(samples) >= 3:
            break
    return max(statistics.median(samples), 1e-9)


def _time_matmul(dev, n: int, timer, repeats: int, budget_s: float) -> float:
    import torch

    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dev)
    b = torch.randn(n, n, generator=gen).to(dev)
    out = torch.empty(n, n, device=dev)
    return _median_seconds(lambda: torch.mm(a, b, out=out), timer, warmup=2, repeats=repeats, budget_s=budget_s)


def _time_copy(dev, elements: int, timer, repeats: int, budget_s: float) -> float:
    import torch

    src = torch.ones(elements, device=dev)
    dst = torch.empty_like(src)
    return _median_seconds(lambda: dst.copy_(src), timer, warmup=2, repeats=repeats, budget_s=budget_s)


def run_benchmark(
    device: str = "cpu",
    *,
    matmul_size: int | None = None,
    copy_mb: int | None = None,
    repeats: int = 10,
    budget_s: float = 1.5,
) -> dict:
    """``{"tflops", "mem_gbps", "device", "matmul_size", "copy_mb"}`` measured on ``device``.

    Sizes default to something that takes milliseconds per run on the device (1024/4096-wide matmuls and
    64/512 MiB copies for CPU/CUDA); ``budget_s`` bounds each measurement's repeats.
    """
    import torch

    dev = torch.device(device)
    is_cuda = dev.type == "cuda"
    n = matmul_size or (4096 if is_cuda else 1024)
    mb = copy_mb or (512 if is_cuda else 64)
    timer = _timer(dev)
    tflops = 2.0 * n**3 / _time_matmul(dev, n, timer, repeats, budget_s) / 1e12
    nbytes = mb * 2**20 // 4 * 4
    mem_gbps = 2.0 * nbytes / _time_copy(dev, nbytes // 4, timer, repeats, budget_s) / 1e9
    if is_cuda:
        torch.cuda.empty_cache()
    return {"tflops": float(f"{tflops:.4g}"), "mem_gbps": float(f"{mem_gbps:.4g}"), "device": str(dev), "matmul_size": n,
            "copy_mb": mb}
