"""Aggregating k = 8 pseudo-gradients of a 25M-parameter model, against a plain memory copy.

    python -m bench.aggregate [--workers 8] [--repeat 5]

Baseline measured in the same run: ``torch.clone`` of the same k updates (the bytes every method must
at least read). GB/s counts the input bytes (k × 4 bytes × parameters) over the median time. Also the
median time to encode and decode one update with each codec, and to screen the k updates.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import fmt_bytes, median_time, print_table
from diloco.aggregate import METHODS, aggregate, screen_updates
from diloco.codecs import CODECS, decode_update, encode_update, reference_of
from diloco.models import init_state

MODEL = {"n_layer": 8, "n_embd": 512, "n_head": 8, "block_size": 256}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    state = init_state("byte-gpt", MODEL, seed=0)
    n = sum(v.numel() for v in state.values())
    gen = torch.Generator().manual_seed(0)
    updates = [{k: torch.randn(v.shape, generator=gen) * 1e-3 for k, v in state.items()} for _ in range(args.workers)]
    nbytes = args.workers * n * 4
    print(f"byte-gpt {MODEL}: {n:,} parameters; k={args.workers} updates = {fmt_bytes(nbytes)}; "
          f"torch threads {torch.get_num_threads()}", flush=True)

    def copy():
        for u in updates:
            for v in u.values():
                torch.clone(v)

    copy_s = median_time(copy, repeat=args.repeat)
    rows = [("copy (torch.clone, baseline)", f"{1000 * copy_s:.1f}", f"{nbytes / copy_s / 1e9:.2f}", "1.00")]
    for method in METHODS:
        t = median_time(lambda m=method: aggregate(updates, m), repeat=args.repeat)
        rows.append((method, f"{1000 * t:.1f}", f"{nbytes / t / 1e9:.2f}", f"{copy_s / t:.2f}"))
    t = median_time(lambda: screen_updates(updates), repeat=max(1, args.repeat // 2))
    rows.append(("screen_updates", f"{1000 * t:.1f}", f"{nbytes / t / 1e9:.2f}", f"{copy_s / t:.2f}"))
    print_table(["operation", "median ms", "GB/s (input)", "vs copy"], rows,
                title=f"aggregating {args.workers} updates of {n / 1e6:.1f}M parameters")

    ref = reference_of(state)
    one = updates[0]
    rows = []
    for codec in CODECS:
        data = encode_update(one, codec)
        enc = median_time(lambda c=codec: encode_update(one, c), repeat=args.repeat)
        dec = median_time(lambda d=data: decode_update(d, ref), repeat=args.repeat)
        rows.append((codec, fmt_bytes(len(data)), f"{4 * n / len(data):.2f}x", f"{1000 * enc:.1f}", f"{1000 * dec:.1f}",
                     f"{4 * n / enc / 1e9:.2f}", f"{4 * n / dec / 1e9:.2f}"))
    print_table(["codec", "size", "vs fp32 params", "encode ms", "decode ms (validated)", "encode GB/s", "decode GB/s"],
                rows, title="codecs, one update")


if __name__ == "__main__":
    main()
