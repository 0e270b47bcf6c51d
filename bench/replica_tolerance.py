"""How close two updates of the same task are, honest or not: the figures behind ``diloco.replica``'s tolerances.

    python -m bench.replica_tolerance            # 2 layers x 64 wide, H=50, int8
    python -m bench.replica_tolerance --quick    # 1 layer x 32 wide, H=10

A first round trains three workers from the same initial weights and takes one outer step, so there is a
public outer step θ_0 − θ_1. From θ_1, the honest reference trains shard 0 for H steps with the task's
seed; each row is another upload for that same task, int8-encoded and decoded as the server sees it,
compared with the reference by ``diloco.replica.compare``:

- same seed, same thread count (the same machine recomputing);  same seed, other thread count (another
  CPU: different reduction order in the matmuls);  same seed in bfloat16 autocast (a GPU's mixed precision
  rounds far more coarsely than fp32: not the same computation, which is why replicas pair like devices);
- honest but another seed (the same shard, other batches);  another shard's honest update;
- free-riders: the last public outer step, the worker's own update of the previous round, noise at the
  reference's norm, zeros.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import print_table
from diloco.codecs import decode_update, encode_update, reference_of
from diloco.data import encode_documents, load_documents, shard_documents, split_documents
from diloco.inner import InnerConfig, inner_train
from diloco.models import init_state, model_with_weights
from diloco.outer import OuterOptimizer
from diloco.replica import Tolerance, compare


def _train(arch, config, state, tokens, cfg, seed, *, threads=None, bf16=False):
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        model = model_with_weights(arch, config, {k: v.clone() for k, v in state.items()})
        if bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return inner_train(model, tokens, cfg, seed=seed).pseudo_gradient
        return inner_train(model, tokens, cfg, seed=seed).pseudo_gradient
    finally:
        torch.set_num_threads(before)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 layer x 32 wide, H=10")
    p.add_argument("--inner-steps", type=int, default=None)
    p.add_argument("--codec", default="int8", choices=["fp32", "fp16", "int8"])
    args = p.parse_args(argv)
    arch = "byte-gpt"
    if args.quick:
        config, steps = {"n_layer": 1, "n_embd": 32, "n_head": 4, "block_size": 32}, 10
    else:
        config, steps = {"n_layer": 2, "n_embd": 64, "n_head": 4, "block_size": 64}, 50
    steps = args.inner_steps or steps
    cfg = InnerConfig(steps=steps, lr=3e-3, batch_size=8, seq_len=config["block_size"], warmup=2)
    train, _held = split_documents(load_documents("builtin:python-docs"), 0.1)
    shards = [encode_documents(shard_documents(train, i, 3)) for i in range(3)]
    theta0 = init_state(arch, config, 0)
    ref = reference_of(theta0)

    def wire(delta):
        return decode_update(encode_update(delta, args.codec), ref)

    t0 = time.perf_counter()
    first = [_train(arch, config, theta0, shards[i], cfg, seed=100 + i) for i in range(3)]
    opt = OuterOptimizer(theta0, lr=0.7, momentum=0.9, nesterov=True)
    mean = {k: sum(u[k] for u in first) / 3 for k in theta0}
    theta1 = opt.step(mean)
    public_step = {k: theta0[k] - theta1[k] for k in theta0}
    threads = torch.get_num_threads()
    other_threads = 1 if threads > 1 else 2
    reference = wire(_train(arch, config, theta1, shards[0], cfg, seed=7))
    norm = torch.sqrt(sum((v.double() ** 2).sum() for v in reference.values())).item()
    gen = torch.Generator().manual_seed(1)
    noise = {k: torch.randn(v.shape, generator=gen) for k, v in reference.items()}
    noise_norm = torch.sqrt(sum((v.double() ** 2).sum() for v in noise.values())).item()
    candidates = [
        ("honest", "same seed, same machine", lambda: _train(arch, config, theta1, shards[0], cfg, 7)),
        ("honest", f"same seed, {other_threads} thread(s) instead of {threads}",
         lambda: _train(arch, config, theta1, shards[0], cfg, 7, threads=other_threads)),
        ("other precision", "same seed, bfloat16 autocast", lambda: _train(arch, config, theta1, shards[0], cfg, 7,
                                                                          bf16=True)),
        ("other work", "same shard, another seed", lambda: _train(arch, config, theta1, shards[0], cfg, 8)),
        ("other work", "another shard, same seed", lambda: _train(arch, config, theta1, shards[1], cfg, 7)),
        ("free-rider", "last public outer step", lambda: public_step),
        ("free-rider", "its own update of the last round", lambda: first[0]),
        ("free-rider", "noise at the honest norm", lambda: {k: v * (norm / noise_norm) for k, v in noise.items()}),
        ("free-rider", "zeros", lambda: {k: torch.zeros_like(v) for k, v in reference.items()}),
    ]
    tol = Tolerance()
    rows = []
    for kind, what, make in candidates:
        delta = make()
        try:
            got = wire(delta)
        except Exception as exc:  # noqa: BLE001 (an all-zero int8 chunk is still encodable; report anything else)
            rows.append([kind, what, "—", "—", f"not encodable: {exc}"])
            continue
        a = compare(reference, got, tolerance=tol)
        rows.append([kind, what, "—" if a.cosine is None else f"{a.cosine:.6f}",
                     "—" if a.norm_rel is None else f"{a.norm_rel:.2e}", "agree" if a.agreed else "disagree"])
    print_table(["upload", "how", "cosine", "norm diff", f"verdict (cos ≥ {tol.cosine:g}, norm ≤ {tol.norm_rel:g})"],
                rows, title=f"Replica agreement: byte-gpt {config['n_layer']}x{config['n_embd']}, H={steps}, "
                            f"{args.codec}, {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
