"""What scoring contributions costs at 25M parameters: k = 8 updates, each scored against the round's centre.

    python -m bench.scoring [--workers 8] [--windows 32] [--seq-len 64] [--threads 2]

Per round the server (``diloco.contributions.check_contributions``) evaluates the base weights on every
shard's windows (``windows`` own + ``ceil(windows / 7)`` other-data windows per shard), the round's centre
(the coordinate median of the k updates) on the same windows, and each update on its own shard's windows
and ``windows`` windows of other shards; and sketches each update for replay detection. Printed: seconds
per round, fp32 and bf16 (bf16 is fast only where the CPU runs it natively, see
``diloco.evaluate.bf16_is_fast``), at ``--windows`` and at half of it. Baseline measured in the same run: one
held-out evaluation as the round already does it (8 batches x 8 windows, ``evaluate_loss``).
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import print_table
from diloco.contributions import ContributionCheck, check_contributions, other_keys, shard_windows
from diloco.data import encode_documents, load_documents, shard_documents, split_documents
from diloco.evaluate import bf16_is_fast, evaluate_loss
from diloco.models import init_state, model_with_weights
from diloco.replay import sketch
from diloco.round import Update, Verdict

MODEL = {"n_layer": 8, "n_embd": 512, "n_head": 8, "block_size": 256}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--windows", type=int, default=32)
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
    ids = list(range(k))
    for windows_n in (w, max(1, w // 2)):
        for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            windows = shard_windows(dict(enumerate(shards)), count=windows_n, seq_len=seq, seed=0)
            check = ContributionCheck(arch="byte-gpt", config=MODEL, windows=windows, own={i: i for i in ids},
                                      other={i: other_keys(i, k, windows) for i in ids}, sketch_seed=1,
                                      autocast_dtype=dtype)
            verdicts = [Verdict(i, True, "accepted", "") for i in ids]
            t = time.perf_counter()
            check_contributions(state, [Update(i, u) for i, u in zip(ids, updates, strict=True)], verdicts, check)
            n_eval = sum(v.shape[0] for v in windows.values()) * 2 + sum(
                windows[i].shape[0] + sum(windows[o].shape[0] for o in check.other[i]) for i in ids)
            rows.append((f"{label}, {windows_n} windows: contribution checks per round ({n_eval} windows evaluated)",
                         f"{time.perf_counter() - t:.2f}"))
    t = time.perf_counter()
    for u in updates:
        sketch(u, seed=1)
    rows.append((f"of which replay sketches, {k} updates (1024 floats each)", f"{time.perf_counter() - t:.2f}"))
    print_table(["phase", "seconds"], rows, title=f"scoring {k} contributions at {n / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
