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


# A ~125M-parameter Llama config (GPT-2-small widths, Llama blocks, a 32k vocabulary), the size the
# decentralised-training projects start at (OpenDiLoCo's llama-150m, Templar's first models).
LLAMA_125M = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
              "num_key_value_heads": 12, "max_position_embeddings": 1024, "vocab_size": 32_000}
TRAIN_CONFIGS = {
    "llama-125m": ("llama", LLAMA_125M),
    "llama-tiny": ("llama", {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "max_position_embeddings": 128}),
}
# Dense bf16 tensor-core peaks from the vendors' data sheets, in TFLOPS, for model FLOPs utilisation.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
                    "RTX 4090": 165.0, "RTX 3090": 71.0}


def model_flops_per_token(arch: str, config: dict, seq_len: int) -> float:
    """Training FLOPs per token: 6 × the parameters that multiply (all but the input embedding) plus
    attention's 12 × layers × width × context (the PaLM paper's accounting, appendix B)."""
    from diloco.models import param_count as count
    from diloco.models import validate_model_config

    c = validate_model_config(arch, config)
    width = c.get("hidden_size") or c["n_embd"]
    layers = c.get("num_hidden_layers") or c["n_layer"]
    matmul_params = count(arch, c) - c["vocab_size"] * width
    return 6.0 * matmul_params + 12.0 * layers * width * seq_len


def _peak_tflops(device) -> tuple[float | None, str]:
    import torch

    if device.type != "cuda":
        return None, ""
    name = torch.cuda.get_device_name(device)
    for key, value in BF16_PEAK_TFLOPS.items():
        if key.lower() in name.lower():
            return value, name
    return None, name


def train_throughput(name: str = "llama-tiny", *, device: str = "cpu", batch_size: int = 8, seq_len: int = 128,
                     steps: int = 20, warmup_steps: int = 3) -> dict:
    """Tokens per second of the agent's own inner loop (``diloco.inner.inner_train``: bf16 autocast and
    fused AdamW on CUDA) on a model of ``TRAIN_CONFIGS``, on random tokens, and its model FLOPs utilisation
    against the GPU's data-sheet bf16 peak where known.

    ``steady_tokens_per_s`` is timed between the progress callbacks of the first and last timed steps
    (each reads the loss, which waits for the GPU), so start-up, the weight snapshots and the closing
    evaluation are left out; ``task_tokens_per_s`` is what a task reports, everything included.
    """
    import time

    import torch

    from diloco.inner import InnerConfig, autocast_dtype, fused_adamw_available, inner_train
    from diloco.models import build_model, param_count

    arch, config = TRAIN_CONFIGS[name]
    dev = torch.device(device)
    vocab = config.get("vocab_size", 256)
    model = build_model(arch, config, seed=0)
    tokens = torch.randint(0, vocab, (max(4 * batch_size * (seq_len + 1), 1 << 16),),
                           generator=torch.Generator().manual_seed(0))
    cfg = InnerConfig(steps=warmup_steps, lr=1e-4, batch_size=batch_size, seq_len=seq_len)
    inner_train(model, tokens, cfg, seed=0, device=dev)  # kernels chosen, allocator warm
    stamps: list[float] = []
    result = inner_train(model, tokens, InnerConfig(steps=steps, lr=1e-4, batch_size=batch_size, seq_len=seq_len),
                         seed=1, device=dev, progress=lambda step, loss: stamps.append(time.perf_counter()))
    per_step = batch_size * seq_len
    steady = per_step * (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9)
    flops = model_flops_per_token(arch, config, seq_len) * steady
    peak, gpu = _peak_tflops(dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {"model": name, "arch": arch, "params": param_count(arch, config), "device": gpu or str(dev),
            "batch_size": batch_size, "seq_len": seq_len, "steps": steps,
            "bf16_autocast": autocast_dtype(dev) is not None, "fused_adamw": fused_adamw_available(dev),
            "steady_tokens_per_s": steady, "task_tokens_per_s": result.tokens_per_s,
            "model_tflops": flops / 1e12, "peak_tflops": peak, "mfu": flops / (peak * 1e12) if peak else None}


def main(argv=None) -> None:
    """``python -m workers.bench --train llama-125m --device cuda``: the inner loop's tokens/s and MFU."""
    import argparse

    ap = argparse.ArgumentParser(description="Measure this machine: matmul/memory, or the inner loop's tokens/s.")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--train", choices=list(TRAIN_CONFIGS), help="time the inner loop on this model instead")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    if not args.train:
        print(run_benchmark(args.device))
        return
    r = train_throughput(args.train, device=args.device, batch_size=args.batch_size, seq_len=args.seq_len,
                         steps=args.steps)
    mfu = f"{100 * r['mfu']:.1f}% of {r['peak_tflops']:g} TFLOPS bf16 peak" if r["mfu"] is not None else "n/a"
    print(f"| model | params | device | batch x seq | bf16 autocast | fused AdamW | tokens/s (steady) | "
          f"tokens/s (task) | model TFLOPS | MFU |\n|---|---|---|---|---|---|---|---|---|---|\n"
          f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['device']} | {r['batch_size']}x{r['seq_len']} | "
          f"{r['bf16_autocast']} | {r['fused_adamw']} | {r['steady_tokens_per_s']:,.0f} | "
          f"{r['task_tokens_per_s']:,.0f} | {r['model_tflops']:.2f} | {mfu} |")


if __name__ == "__main__":
    main()
