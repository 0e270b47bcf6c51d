"""What scoring contributions costs at 25M parameters: k = 8 updates, each scored on its own shard and another.

    python -m bench.scoring [--workers 8] [--windows 16] [--seq-len 64] [--threads 2]

Per round the server evaluates the base weights once per shard (k × windows) and each update once on its
own and the other shard's windows together (k × 2 × windows), then sketches each update for replay
detection. Printed: seconds per phase and per round, fp32 and bf16 (bf16 is fast only where the CPU runs it
natively, see ``diloco.evaluate.bf16_is_fast``). Baseline measured in the same run: one held-out
evaluation as the round already does it (8 batches × 8 windows, ``evaluate_loss``).
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import print_table
from diloco.data import encode_documents, load_documents, shard_documents, split_documents
from diloco.evaluate import bf16_is_fast, evaluate_loss
from diloco.models import init_state, model_with_weights
from diloco.replay import sketch
from diloco.scoring import judge, score_windows, update_gains, windows_loss

MODEL = {"n_layer": 8, "n_embd": 512, "n_head": 8, "block_size": 256}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    k, w, seq = args.workers, args.windows, args.seq_len
    state = init_state("byte-gpt", MODEL, seed=0)
    n = sum(v.numel() for v in state.values())
    train, held = split_documents(load_documents("builtin:python-docs"), 0.1)
    shards = [encode_documents(shard_documents(train, i, k)) for i in range(k)]
    gen = torch.Generator().manual_seed(0)
    updates = [{name: torch.randn(v.shape, generator=gen) * 1e-4 for name, v in state.items()} for _ in range(k)]
    print(f"byte-gpt {MODEL}: {n:,} parameters; k={k}; {w} windows of {seq} bytes per shard; "
          f"torch threads {torch.get_num_threads()}; bf16 native: {bf16_is_fast('cpu')}", flush=True)
    rows = []
    t = time.perf_counter()
    evaluate_loss(model_with_weights("byte-gpt", MODEL, state), encode_documents(held), batch_size=8, seq_len=seq,
                  batches=8)
    rows.append(("held-out eval as the round does it (64 windows, fp32), baseline", f"{time.perf_counter() - t:.2f}"))
    for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        windows = [score_windows(s, count=w, seq_len=seq, seed=i) for i, s in enumerate(shards)]
        t = time.perf_counter()
        before = [windows_loss("byte-gpt", MODEL, state, win, autocast_dtype=dtype) for win in windows]
        t_before = time.perf_counter() - t
        t = time.perf_counter()
        gains = [update_gains(arch="byte-gpt", config=MODEL, base=state, update=u, own=windows[i],
                              other=windows[(i + 1) % k], own_before=before[i], other_before=before[(i + 1) % k],
                              autocast_dtype=dtype) for i, u in enumerate(updates)]
        t_after = time.perf_counter() - t
        judge(gains)
        rows.append((f"{label}: base losses, {k} shards x {w} windows", f"{t_before:.2f}"))
        rows.append((f"{label}: {k} updates x {2 * w} windows", f"{t_after:.2f}"))
        rows.append((f"{label}: scoring per round", f"{t_before + t_after:.2f}"))
    t = time.perf_counter()
    for u in updates:
        sketch(u, seed=1)
    rows.append((f"replay sketches, {k} updates (1024 floats each)", f"{time.perf_counter() - t:.2f}"))
    print_table(["phase", "seconds"], rows, title=f"scoring {k} contributions at {n / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
