"""Does DiLoCo keep the quality of data-parallel training at a fraction of the communication?

    python -m bench.fidelity            # full: run lengths 200/400/800 steps, lr sweeps (~9 CPU-minutes)
    python -m bench.fidelity --quick    # smaller model, 100/200 steps, no sweep (~70 s on 2 idle cores)

Every arm sees the same held-out split of ``builtin:python-docs`` and (except the single worker) the
same number of training tokens; k = 4 workers each own one shard of the training documents.

- data-parallel (DP): every step averages the gradients of the k workers' micro-batches (gradient
  accumulation), i.e. one AdamW step on the k× larger batch; one sync (an fp32 gradient) per step.
  lr tuned by a sweep. Per-worker compute = mean micro-batch forward/backward + the optimizer step.
- DiLoCo fp32 / int8: k workers, H = 50 inner AdamW steps between syncs, outer Nesterov SGD; the inner
  lr is swept like DP's, then the outer lr at the best inner lr. int8 reuses fp32's tuned values.
- FedAvg: DiLoCo with outer lr 1 and no momentum (the average of the workers' models).
- single worker: one worker doing the same number of inner steps on its own shard and batch (k× fewer
  tokens), the DiLoCo paper's baseline.

Runs use a constant lr after warmup, so a run's loss at step L is the loss of a run of length L.
Simulated time over a 100 Mbit/s link per worker = measured compute per worker (workers run in parallel
in this simulation: DP's step time / k, DiLoCo's mean inner time per worker) + bytes uploaded per worker
/ bandwidth (the upload is the bottleneck of volunteer links; downloads are not counted for any arm).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import time

import torch

from bench.common import fmt_bytes, print_table

K = 4
H = 50
WARMUP = 20
LINK_BITS_PER_S = 100e6


def _setup(model_cfg):
    from diloco.data import encode_documents, load_documents, shard_documents, split_documents

    torch.set_num_threads(1)
    train, held = split_documents(load_documents("builtin:python-docs"), 0.1, seed=0)
    shards = [encode_documents(shard_documents(train, i, K)) for i in range(K)]
    return shards, encode_documents(held)


def _eval(model, held, seq_len):
    from diloco.evaluate import evaluate_loss

    return evaluate_loss(model, held, batch_size=32, seq_len=seq_len, batches=8)


def run_dp(p: dict) -> dict:
    """One AdamW step per iteration on the k workers' micro-batches together (= averaged gradients)."""
    from diloco.data import sample_batch
    from diloco.inner import InnerConfig, make_optimizer
    from diloco.models import build_model

    shards, held = _setup(p["model"])
    model = build_model("byte-gpt", p["model"], seed=0)
    cfg = InnerConfig(steps=1, lr=p["lr"], batch_size=p["batch"], seq_len=p["seq_len"], warmup=WARMUP)
    opt = make_optimizer(model, cfg)
    params = list(model.parameters())
    n_params = sum(x.numel() for x in params)
    gens = [torch.Generator().manual_seed(w) for w in range(K)]
    curve, compute = [], 0.0
    torch.manual_seed(0)
    for step in range(1, p["steps"] + 1):
        # Each of the k workers computes the gradient of its own micro-batch (timed separately: they would
        # run in parallel); the averaged gradient then drives one AdamW step, which every worker performs.
        opt.zero_grad(set_to_none=True)
        micro = 0.0
        for w in range(K):
            started = time.perf_counter()
            x, y = sample_batch(shards[w], p["batch"], p["seq_len"], gens[w])
            _, loss = model(x, y)
            (loss / K).backward()
            micro += time.perf_counter() - started
        started = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        for g in opt.param_groups:
            g["lr"] = p["lr"] * min(1.0, step / WARMUP)
        opt.step()
        compute += micro / K + (time.perf_counter() - started)
        if step in p["eval_at"]:
            curve.append({"step": step, "loss": _eval(model, held, p["seq_len"]), "compute_s": compute,
                          "syncs": step, "bytes": step * 4 * n_params})
    return {"name": p["name"], "curve": curve}


def run_diloco(p: dict) -> dict:
    """k workers × H inner steps, encode/decode their pseudo-gradients, mean, outer step."""
    from diloco.aggregate import aggregate
    from diloco.codecs import decode_update, encode_update, reference_of
    from diloco.inner import InnerConfig, inner_train
    from diloco.models import build_model, init_state
    from diloco.outer import OuterOptimizer

    shards, held = _setup(p["model"])
    k = p.get("workers", K)
    params = init_state("byte-gpt", p["model"], seed=0)
    ref = reference_of(params)
    outer = OuterOptimizer(params, lr=p["outer_lr"], momentum=p["momentum"], nesterov=p["momentum"] > 0)
    cfg = InnerConfig(steps=H, lr=p["lr"], batch_size=p["batch"], seq_len=p["seq_len"], warmup=WARMUP)
    model = build_model("byte-gpt", p["model"])
    states = [None] * k
    curve, compute, sent = [], 0.0, 0
    for rnd in range(p["steps"] // H):
        updates, inner_seconds = [], 0.0
        for w in range(k):
            model.load_state_dict(params)
            result = inner_train(model, shards[w], cfg, seed=1000 * rnd + w, optimizer_state=states[w])
            states[w] = result.optimizer_state
            inner_seconds += result.seconds
            if p["codec"]:
                data = encode_update(result.pseudo_gradient, p["codec"])
                sent += len(data) if w == 0 else 0
                updates.append(decode_update(data, ref))
            else:
                updates.append(result.pseudo_gradient)
        started = time.perf_counter()
        params = outer.step(aggregate(updates, "mean"))
        compute += inner_seconds / k + (time.perf_counter() - started)
        step = (rnd + 1) * H
        if step in p["eval_at"]:
            model.load_state_dict(params)
            curve.append({"step": step, "loss": _eval(model, held, p["seq_len"]), "compute_s": compute,
                          "syncs": rnd + 1 if p["codec"] else 0, "bytes": sent})
    return {"name": p["name"], "curve": curve}


def _run(p: dict) -> dict:
    return run_dp(p) if p["kind"] == "dp" else run_diloco(p)


def _pool(jobs: int):
    return cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"))


def _final(res: dict) -> float:
    return res["curve"][-1]["loss"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model, short runs, no sweep")
    ap.add_argument("--jobs", type=int, default=2, help="arms run in parallel, one thread each")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    if args.quick:
        model = {"n_layer": 2, "n_embd": 64, "n_head": 4, "block_size": 64}
        lengths, batch, seq_len = [100, 200], 8, 64
        dp_grid, inner_grid, outer_grid = [2e-3], [2e-3], [0.7]
    else:
        model = {"n_layer": 2, "n_embd": 128, "n_head": 4, "block_size": 64}
        lengths, batch, seq_len = [200, 400, 800], 8, 64
        dp_grid, inner_grid, outer_grid = [1e-3, 2e-3, 4e-3], [1e-3, 2e-3, 4e-3], [0.4, 0.7, 1.0]
    sweep_len = lengths[0]
    base = {"model": model, "batch": batch, "seq_len": seq_len}
    n_params = sum(v.numel() for v in __import__("diloco.models", fromlist=["init_state"]).init_state(
        "byte-gpt", model, 0).values())
    print(f"model byte-gpt {model} = {n_params:,} parameters; k={K} workers, per-worker batch {batch}x{seq_len}, "
          f"H={H}; DP batch {K * batch}x{seq_len}", flush=True)

    sweep_rows = []
    with _pool(args.jobs) as pool:
        best_dp, best_inner, best_outer = dp_grid[0], inner_grid[0], outer_grid[0]
        if len(dp_grid) > 1 or len(inner_grid) > 1 or len(outer_grid) > 1:
            jobs = [{**base, "kind": "dp", "name": f"DP lr={lr:g}", "lr": lr, "steps": sweep_len,
                     "eval_at": [sweep_len]} for lr in dp_grid]
            jobs += [{**base, "kind": "diloco", "name": f"DiLoCo lr={lr:g} outer=0.7", "lr": lr, "outer_lr": 0.7,
                      "momentum": 0.9, "codec": "fp32", "steps": sweep_len, "eval_at": [sweep_len]}
                     for lr in inner_grid]
            results = list(pool.map(_run, jobs))
            for j, r in zip(jobs, results, strict=True):
                sweep_rows.append((j["name"], sweep_len, _final(r)))
            dp_res = results[: len(dp_grid)]
            di_res = results[len(dp_grid):]
            best_dp = dp_grid[min(range(len(dp_grid)), key=lambda i: _final(dp_res[i]))]
            best_inner = inner_grid[min(range(len(inner_grid)), key=lambda i: _final(di_res[i]))]
            outer_jobs = [{**base, "kind": "diloco", "name": f"DiLoCo lr={best_inner:g} outer={o:g}", "lr": best_inner,
                           "outer_lr": o, "momentum": 0.9, "codec": "fp32", "steps": sweep_len,
                           "eval_at": [sweep_len]} for o in outer_grid if o != 0.7]
            outer_results = list(pool.map(_run, outer_jobs))
            scored = [(0.7, _final(di_res[inner_grid.index(best_inner)]))]
            for j, r in zip(outer_jobs, outer_results, strict=True):
                sweep_rows.append((j["name"], sweep_len, _final(r)))
                scored.append((j["outer_lr"], _final(r)))
            best_outer = min(scored, key=lambda s: s[1])[0]
            print_table(["sweep run", "steps", "held-out loss"], sweep_rows,
                        title=f"lr sweep (chosen: DP lr {best_dp:g}; DiLoCo inner lr {best_inner:g}, outer lr {best_outer:g})")

        steps = lengths[-1]
        common = {**base, "steps": steps, "eval_at": list(range(H, steps + 1, H))}
        arms = [
            {**common, "kind": "dp", "name": "data-parallel", "lr": best_dp},
            {**common, "kind": "diloco", "name": "DiLoCo fp32", "lr": best_inner, "outer_lr": best_outer,
             "momentum": 0.9, "codec": "fp32"},
            {**common, "kind": "diloco", "name": "DiLoCo int8", "lr": best_inner, "outer_lr": best_outer,
             "momentum": 0.9, "codec": "int8"},
            {**common, "kind": "diloco", "name": "FedAvg fp32", "lr": best_inner, "outer_lr": 1.0,
             "momentum": 0.0, "codec": "fp32"},
            {**common, "kind": "diloco", "name": "single worker", "lr": best_inner, "outer_lr": 1.0,
             "momentum": 0.0, "codec": None, "workers": 1},
        ]
        results = {r["name"]: r for r in pool.map(_run, arms)}

    def sim_time(point):
        return point["compute_s"] + point["bytes"] * 8 / LINK_BITS_PER_S

    def at(name, length):
        return next(pt for pt in results[name]["curve"] if pt["step"] == length)

    for length in lengths:
        dp_loss = at("data-parallel", length)["loss"]
        fp32_point = at("DiLoCo fp32", length)
        rows = []
        for arm in arms:
            pt = at(arm["name"], length)
            tokens = length * batch * seq_len * arm.get("workers", K)
            rows.append((arm["name"], f"{pt['loss']:.4f}", f"{100 * (pt['loss'] / dp_loss - 1):+.2f}%", f"{tokens:,}",
                         pt["syncs"], fmt_bytes(pt["bytes"]),
                         f"{pt['bytes'] / fp32_point['bytes']:.2f}x" if fp32_point["bytes"] else "-",
                         f"{sim_time(pt):.1f}"))
        print_table(["arm", "held-out loss", "vs DP", "tokens", "syncs", "bytes sent/worker",
                     "bytes vs DiLoCo fp32", "sim. time @100Mbit/s (s)"], rows,
                    title=f"{length} steps (per worker)")

    target = max(_final(results["data-parallel"]), _final(results["DiLoCo fp32"]))
    rows = []
    times = {}
    for arm in arms:
        hit = next((pt for pt in results[arm["name"]]["curve"] if pt["loss"] <= target), None)
        times[arm["name"]] = sim_time(hit) if hit else None
        rows.append((arm["name"], hit["step"] if hit else "not reached",
                     f"{hit['compute_s']:.1f}" if hit else "-",
                     f"{hit['bytes'] * 8 / LINK_BITS_PER_S:.1f}" if hit else "-",
                     f"{times[arm['name']]:.1f}" if hit else "-"))
    print_table(["arm", "step reached", "compute (s)", "link (s)", "total (s)"], rows,
                title=f"time to held-out loss {target:.4f} over a simulated 100 Mbit/s link per worker")
    dp_t, di_t, q_t = times["data-parallel"], times["DiLoCo fp32"], times["DiLoCo int8"]
    if dp_t and di_t:
        print(f"\nDiLoCo fp32 reaches the target {dp_t / di_t:.1f}x sooner than DP"
              + (f"; int8 {dp_t / q_t:.1f}x" if q_t else ""))
    dp_final, fp32_final, int8_final = (_final(results[n]) for n in ("data-parallel", "DiLoCo fp32", "DiLoCo int8"))
    last = -1
    print(f"longest run: DiLoCo fp32 vs DP {100 * (fp32_final / dp_final - 1):+.2f}% loss at "
          f"{results['data-parallel']['curve'][last]['bytes'] / results['DiLoCo fp32']['curve'][last]['bytes']:.0f}x fewer bytes; "
          f"int8 vs fp32 {100 * (int8_final / fp32_final - 1):+.2f}% at "
          f"{results['DiLoCo fp32']['curve'][last]['bytes'] / results['DiLoCo int8']['curve'][last]['bytes']:.2f}x fewer bytes; "
          f"FedAvg {_final(results['FedAvg fp32']):.4f}, single worker {_final(results['single worker']):.4f}")
    print(f"bench wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
