"""SparseLoCo arms of ``bench.fidelity``: sparse low-bit pseudo-gradients with error feedback, the exact
published step downloaded instead of the weights, with and without overlap.

    python -m bench.fidelity_sparse            # 3000 steps: DP, DiLoCo fp32 and the sparse arms, tuned lrs
    python -m bench.fidelity_sparse --quick    # 200 steps
    python -m bench.fidelity_sparse --outer-lrs 2 --variants overlap,3%,momentum,beta0.99 --jobs 7 --json run.json
    python -m bench.fidelity_sparse --from-json run.json --step-ms 8.9   # the tables again, at another compute
    python -m bench.fidelity_sparse --model n_embd=128 --lengths 1500,3000 --outer-lrs 2 --variants h25   # 470k

``bench.fidelity`` runs these arms beside its own (``kind: "sparse"``); this module's ``main`` runs just DP,
DiLoCo fp32 and the sparse arms with the lrs the full sweep of ``bench.fidelity`` chose (DP 2e-3; DiLoCo
inner 1e-3, outer 0.7), for a shorter run on a busy machine. Bytes, tokens, links and time to target are
counted as in ``bench.fidelity``; the sparse arms count every worker's upload (the encoded sparse update)
and download (the encoded published step).

Choices, and why:

- Outer lr grid {1, 2, 4}: {1, 2} had its best value on its edge. Run to 1000 steps (20 rounds, 2% topk2,
  β 0.95) the held-out loss was 2.431 at 1, 2.191 at 2, 2.208 at 4 and 2.513 at 8 (unstable early). Error
  feedback sends each value once (it never amplifies a direction the way outer momentum does), and the mean
  of four updates with mostly different kept coordinates carries about a quarter of each, so the step wants
  an lr above 1.
- Variants (``--variants``): overlap; 1% and 3% density; 4 bits; Nesterov momentum 0.9 on top at the same
  effective step; error-feedback β 0.99, and β 0.8 with outer lr ×1.5 (in an exploratory 3000-step trial,
  eight pairs of β in {0.7, 0.8, 0.9, 0.95} and outer lr in {2, 2.5, 3, 4} ended between 1.456 and 1.540,
  β 0.95 with 2 at 1.496: no pair moves the loss by more than the spread between neighbours); H=25 at 2%
  and at 1%, and H=10 at 1% (more rounds at the same tokens; the same bytes as H=50 at 2%, or more); and ``dense-defaults``, what a sparse run got
  from the dense spec defaults (outer lr 0.7, outer momentum 0.9 as β) before a sparse codec brought its own.
  ``diloco-h25`` adds DiLoCo fp32 at H=25 (dense, the sparse H=25 arms' round length) beside the baseline at H=50.
- Chunk: the sparse arms use a sparse run's default, 4096 (``spec.diloco.sparse_chunk``); ``chunk32k`` and
  ``h25-chunk32k`` are the same arms at 32768 (every tensor of the 137k model is shorter, so each keeps its
  own top 2%: a short chunk keeps the same share as a full one). At the same share 32768 did no better.
- Overlap: the arm trains each round wholly ahead, as ``workers.overlap`` does when the link is the slower
  part (see :func:`run_sparse`). An earlier version restarted every round from the checkpoint one round old,
  dropping the worker's own last progress: not what the agent does.
- Time to target (as in ``bench.fidelity``): the loss both DP and DiLoCo fp32 reach on the longest run,
  i.e. DiLoCo fp32's final loss. Simulated time is steps x compute per step + bytes / link, so an arm that
  needs as many steps as DP is at most ``1 + DP's link time per step / compute per step`` times sooner,
  whatever it sends: 15.7x at 8.9 ms a step (the 137k-parameter model on an idle core of this CPU). The
  report prints that bound, and a labelled projection at the 25M model's compute, where DP's traffic
  weighs more. On a loaded machine the measured compute per step is inflated; ``--step-ms`` and
  ``--from-json`` recompute the simulated times at a given compute without running again.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench.common import fmt_bytes, print_table

SPARSE_OUTER_GRID = (1.0, 2.0, 4.0)
SPARSE_BETA = 0.95
SPARSE_MAIN = "SparseLoCo topk2 2%"
SPARSE_CHUNK = 4096  # a sparse run's default chunk (``governance.specs.sparse_defaults``)


def run_sparse(p: dict) -> dict:
    """SparseLoCo: k workers × H inner steps; each sends the top-k of its error-feedback buffer (2 or 4
    bits) and keeps the rest; the server takes a plain SGD step (or a momentum one) on the mean of the
    decoded updates, rounded to the published step, which the workers download and apply instead of the
    weights. With ``overlap`` every worker trains each round wholly ahead, as the agent does when its link
    is slower than its GPU (``workers.overlap``): it goes on from where its last round ended while that
    round's update travels and is aggregated, then moves that progress onto the new checkpoint. So round
    r's update is H steps from θ_{r-1} − Δ_{r-1} (the checkpoint the worker had, plus its own last
    progress; the others' last updates are one round late) and is applied to θ_r."""
    from bench.fidelity import WARMUP, H, K, _bpb, _eval, _setup

    H = p.get("h", H)  # noqa: N806 - a variant may sync more often at the same tokens
    from diloco.aggregate import aggregate
    from diloco.codecs import decode_update, reference_of
    from diloco.inner import InnerConfig, inner_train
    from diloco.models import build_model, init_state
    from diloco.outer import OuterOptimizer
    from diloco.sparse import ErrorFeedback, apply_published_delta, encode_published_delta

    shards, held, bytes_per_token, vocab = _setup(p)
    arch = p.get("arch", "byte-gpt")
    params = init_state(arch, p["model"], seed=0, vocab_size=vocab)
    ref = reference_of(params)
    outer = OuterOptimizer(params, lr=p["outer_lr"], momentum=p["momentum"], nesterov=p["momentum"] > 0,
                           publish="int8")
    cfg = InnerConfig(steps=H, lr=p["lr"], batch_size=p["batch"], seq_len=p["seq_len"], warmup=WARMUP)
    model = build_model(arch, p["model"], vocab_size=vocab)
    feedback = [ErrorFeedback(codec=p["codec"], beta=p["beta"], density=p["density"], chunk=p.get("chunk", 4096))
                for _ in range(K)]
    states = [None] * K
    curve, moved, previous = [], 0, params
    last = [None] * K  # with overlap: each worker's last pseudo-gradient (dense, before compression)
    for rnd in range(p["steps"] // H):
        updates = []
        for w in range(K):
            if p["overlap"] and last[w] is not None:
                model.load_state_dict({n: previous[n] - last[w][n] for n in previous})
            else:
                model.load_state_dict(params)
            result = inner_train(model, shards[w], cfg, seed=1000 * rnd + w, optimizer_state=states[w])
            states[w] = result.optimizer_state
            last[w] = result.pseudo_gradient
            data = feedback[w].encode(result.pseudo_gradient)
            moved += len(data) if w == 0 else 0  # upload of worker 0 (all workers send the same size)
            updates.append(decode_update(data, ref))
        outer.step(aggregate(updates, p.get("aggregator", "mean")))
        published = encode_published_delta(outer.last_delta)
        moved += len(published)  # every worker downloads the step, not the weights
        previous, params = params, apply_published_delta(params, published)  # what the workers rebuild
        if not all(torch.equal(params[n], outer.params[n]) for n in params):
            raise AssertionError("the published step does not rebuild the server's weights bitwise")
        step = (rnd + 1) * H
        if step in p["eval_at"]:
            model.load_state_dict(params)
            loss = _eval(model, held, p["seq_len"])
            curve.append({"step": step, "loss": loss, "bpb": _bpb(loss, bytes_per_token), "syncs": rnd + 1,
                          "bytes": moved, "overlap": p["overlap"]})
    return {"name": p["name"], "curve": curve}


def sparse_arm(common: dict, lr: float, olr: float, *, codec="topk2", density=0.02, overlap=False, mom=0.0,
               name=None, beta=SPARSE_BETA, h=None, chunk=SPARSE_CHUNK) -> dict:
    from bench.fidelity import H

    return {**common, "kind": "sparse", "name": name or f"SparseLoCo {codec} {density:.0%} outer lr={olr:g}",
            "lr": lr, "outer_lr": olr, "momentum": mom, "codec": codec, "density": density, "beta": beta,
            "overlap": overlap, "h": h or H, "chunk": chunk}


VARIANTS = ("overlap", "1%", "3%", "topk4", "momentum", "beta0.99", "beta0.8", "h25", "h25-1%", "h10",
            "chunk32k", "h25-chunk32k", "dense-defaults")
DENSE_VARIANTS = ("diloco-h25",)  # DiLoCo fp32 at H=25: the sparse H=25 arms' round length, dense


def sparse_arms(pool, common: dict, inner_lr: float, *, quick: bool, momentum: float = 0.9, grid=None,
                variants=VARIANTS, extra=()):
    """Run the sparse arms in ``pool``: the 2% topk2 arm's outer lr is swept over ``grid`` (the mean of
    sparse updates is smaller than a dense mean where the workers' kept coordinates differ); the
    ``variants`` reuse the winner. With a one-value grid every arm runs at once, beside the ``extra`` jobs
    (whose futures are returned with the rest). Returns ``(arms, results by name, chosen outer lr)``."""
    from bench.fidelity import _final, _run

    grid = tuple(grid or ((1.0,) if quick else SPARSE_OUTER_GRID))
    variants = ("overlap",) if quick else tuple(variants)

    def variant_arms(olr):
        table = {"overlap": sparse_arm(common, inner_lr, olr, overlap=True, name=f"{SPARSE_MAIN} + overlap"),
                 "1%": sparse_arm(common, inner_lr, olr, density=0.01, name="SparseLoCo topk2 1%"),
                 "3%": sparse_arm(common, inner_lr, olr, density=0.03, name="SparseLoCo topk2 3%"),
                 "topk4": sparse_arm(common, inner_lr, olr, codec="topk4", name="SparseLoCo topk4 2%"),
                 # Nesterov momentum on top of error feedback, at the same effective step size
                 "momentum": sparse_arm(common, inner_lr, olr * (1 - momentum), mom=momentum,
                                        name=f"{SPARSE_MAIN} + outer momentum"),
                 "beta0.99": sparse_arm(common, inner_lr, olr, beta=0.99, name=f"{SPARSE_MAIN} β 0.99"),
                 # a shorter memory with a larger step (the best pair of a 3000-step β × outer lr trial)
                 "beta0.8": sparse_arm(common, inner_lr, 1.5 * olr, beta=0.8,
                                       name=f"{SPARSE_MAIN} β 0.8, outer lr {1.5 * olr:g}"),
                 # more rounds at the same tokens: fresher errors, more bytes
                 "h25": sparse_arm(common, inner_lr, olr, h=25, name="SparseLoCo topk2 2%, H=25"),
                 "h25-1%": sparse_arm(common, inner_lr, olr, density=0.01, h=25, name="SparseLoCo topk2 1%, H=25"),
                 "h10": sparse_arm(common, inner_lr, olr, density=0.01, h=10, name="SparseLoCo topk2 1%, H=10"),
                 # the top 2% of every 32768 values instead of every 4096 (the same share)
                 "chunk32k": sparse_arm(common, inner_lr, olr, chunk=32768, name="SparseLoCo topk2 2%, chunk 32768"),
                 "h25-chunk32k": sparse_arm(common, inner_lr, olr, chunk=32768, h=25,
                                            name="SparseLoCo topk2 2%, H=25, chunk 32768"),
                 # what a sparse run got from the dense defaults (outer lr 0.7, outer momentum 0.9 as β)
                 "dense-defaults": sparse_arm(common, inner_lr, 0.7, beta=0.9,
                                              name="topk2 2%, dense defaults (outer lr 0.7, β 0.9)")}
        return [table[v] for v in variants]

    first = [sparse_arm(common, inner_lr, olr) for olr in grid]
    later = variant_arms(grid[0]) if len(grid) == 1 else []
    futures = {j["name"]: pool.submit(_run, j) for j in [*extra, *first, *later]}
    done = {j["name"]: futures[j["name"]].result() for j in first}
    best = min(grid, key=lambda olr: _final(done[sparse_arm(common, inner_lr, olr)["name"]]))
    arms = [sparse_arm(common, inner_lr, best, name=SPARSE_MAIN)]
    done[SPARSE_MAIN] = done[sparse_arm(common, inner_lr, best)["name"]]
    if not later:
        later = variant_arms(best)
        futures.update({j["name"]: pool.submit(_run, j) for j in later})
    done.update({j["name"]: futures[j["name"]].result() for j in [*extra, *later]})
    return arms + later, done, best


def sim_time(point: dict, per_step: float, link_bits_per_s: float, h: int, scale: float = 1.0) -> float:
    """Simulated seconds to reach ``point``: compute plus link time; with overlap each round's traffic travels
    while the next round trains (a round takes the longer of the two; the last round's traffic is waited for)."""
    link = point["bytes"] * scale * 8 / link_bits_per_s
    if point.get("overlap"):
        rounds = point["syncs"]
        per_round = link / rounds
        return rounds * max(h * per_step, per_round) + per_round
    return point["step"] * per_step + link


def projection(arms: list[dict], hits: dict, family: dict, batch: int, seq_len: int, big_step_s: float = 0.0) -> None:
    """PROJECTION, not measured: the steps each arm needed to reach the target, at the compute per step of
    ``bench.fidelity``'s 25M-parameter model (measured here, 3 steps) and with every byte count scaled by
    the parameter ratio: with its compute per step, DP's traffic weighs relatively more than with the
    137k-parameter model."""
    from bench.fidelity import LINK_BITS_PER_S, PROJECTED_MODEL, H, _n_params, _step_seconds

    scale = _n_params("byte-gpt", PROJECTED_MODEL) / _n_params(family["arch"], family["model"])
    given = big_step_s > 0
    big_step_s = big_step_s if given else _step_seconds("byte-gpt", PROJECTED_MODEL, batch, seq_len, repeat=3)
    dp = hits["data-parallel"]
    dp_t = sim_time(dp, big_step_s, LINK_BITS_PER_S, H, scale) if dp else None
    rows = []
    for arm in arms:
        hit = hits[arm["name"]]
        t = sim_time(hit, big_step_s, LINK_BITS_PER_S, arm.get("h", H), scale) if hit else None
        rows.append((arm["name"], hit["step"] if hit else "not reached", f"{t:.0f}" if t else "-",
                     f"{dp_t / t:.1f}x" if t and dp_t else "-"))
    print_table(["arm", "step reached (small model)", "total (s)", "sooner than DP"], rows,
                title=f"PROJECTION, not measured: the same steps to the target with the {PROJECTED_MODEL} model's "
                      f"compute ({big_step_s:.2f} s/step, {'given' if given else 'measured here'}) and bytes x{scale:.0f}")


def _run_arms(args, common: dict, grid, variants, lrs) -> tuple[list[dict], dict, float, float]:
    """DP, DiLoCo fp32 and the sparse arms; returns ``(arms, results by name, sparse outer lr, compute s/step)``,
    the compute being the lower of the median step times measured before and after the runs."""
    from bench.fidelity import K, _pool, _step_seconds

    dp_lr, inner_lr, outer_lr = lrs
    shape = (common["arch"], common["model"], common["batch"], common["seq_len"])
    step_before = _step_seconds(*shape, repeat=30)
    dense = [{**common, "kind": "dp", "name": "data-parallel", "lr": dp_lr},
             {**common, "kind": "diloco", "name": "DiLoCo fp32", "lr": inner_lr, "outer_lr": outer_lr,
              "momentum": 0.9, "codec": "fp32", "workers": K}]
    if "diloco-h25" in variants:
        dense.append({**dense[1], "name": "DiLoCo fp32, H=25", "h": 25})
    started = time.perf_counter()
    with _pool(args.jobs) as pool:
        arms, results, best = sparse_arms(pool, common, inner_lr, quick=args.quick, grid=grid,
                                          variants=[v for v in variants if v not in DENSE_VARIANTS], extra=dense)
    print(f"all arms done after {time.perf_counter() - started:.0f} s", flush=True)
    return dense + arms, results, best, min(step_before, _step_seconds(*shape, repeat=30))


def main(argv=None) -> None:
    from bench.fidelity import FAMILIES, LINK_BITS_PER_S, H, K, _at, _final

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 steps, no outer lr sweep")
    ap.add_argument("--jobs", type=int, default=2, help="arms run in parallel, one thread each")
    ap.add_argument("--lengths", default="750,1500,3000", help="run lengths in steps, comma separated (multiples of H)")
    ap.add_argument("--outer-lrs", default=",".join(f"{x:g}" for x in SPARSE_OUTER_GRID),
                    help="the sparse outer lr grid, judged at the longest length; one value: no sweep")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"variants beside the 2%% topk2 arm, comma separated, from {','.join(VARIANTS + DENSE_VARIANTS)} "
                         "(or 'none')")
    ap.add_argument("--step-ms", type=float, default=0.0,
                    help="compute per training step for the simulated times, in ms (default: measured here)")
    ap.add_argument("--projected-step-s", type=float, default=0.0,
                    help="compute per step of the 25M model for the projection, in s (default: measured here)")
    ap.add_argument("--model", default="",
                    help="byte-gpt shape overrides, e.g. n_embd=128,n_layer=4 (the lrs stay those tuned at 137k)")
    ap.add_argument("--json", default="", help="also write every arm's curve to this file")
    ap.add_argument("--from-json", default="", help="print the tables of a run saved with --json (runs nothing)")
    args = ap.parse_args(argv)
    grid = [float(x) for x in args.outer_lrs.split(",")]
    variants = [] if args.variants == "none" else args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS) - set(DENSE_VARIANTS):
        ap.error(f"--variants: unknown {sorted(unknown)}; known: {', '.join(VARIANTS + DENSE_VARIANTS)}")
    started = time.perf_counter()
    family = dict(FAMILIES["byte-gpt"])
    if args.model:
        try:
            shape = {k.strip(): int(v) for k, v in (item.split("=") for item in args.model.split(","))}
        except ValueError:
            ap.error("--model: give name=integer pairs, e.g. n_embd=128,n_layer=4")
        if unknown := set(shape) - set(family["model"]):
            ap.error(f"--model: unknown {sorted(unknown)}; known: {', '.join(family['model'])}")
        family["model"] = {**family["model"], **shape}
    batch, seq_len = 8, 64
    lengths = [100, 200] if args.quick else [int(n) for n in args.lengths.split(",")]
    dp_lr, inner_lr, outer_lr = (4e-3, 4e-3, 0.7) if args.quick else (2e-3, 1e-3, 0.7)
    steps = lengths[-1]
    common = {"arch": family["arch"], "model": family["model"], "batch": batch, "seq_len": seq_len, "steps": steps,
              "eval_at": list(range(H, steps + 1, H))}
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        arms, results, best, measured_s = (saved[k] for k in ("arms", "results", "best_outer_lr", "measured_step_s"))
        lengths = [n for n in lengths if n <= arms[0]["steps"]]
        grid = saved.get("grid", grid)
    else:
        arms, results, best, measured_s = _run_arms(args, common, grid, variants, (dp_lr, inner_lr, outer_lr))
    step_s = args.step_ms / 1e3 if args.step_ms else measured_s
    if args.json and not args.from_json:
        with open(args.json, "w") as f:
            json.dump({"arms": arms, "results": results, "best_outer_lr": best, "measured_step_s": measured_s,
                       "grid": grid}, f)
    from bench.fidelity import _n_params

    print(f"byte-gpt {family['model']} ({_n_params('byte-gpt', family['model']):,} parameters); k={K}, H={H}, batch {batch}x{seq_len} per worker; DP lr {dp_lr:g}, DiLoCo "
          f"inner {inner_lr:g} outer {outer_lr:g} (Nesterov 0.9); sparse outer lr {best:g} (from "
          f"{grid}), error feedback beta {SPARSE_BETA}; compute {1e3 * step_s:.1f} ms/step"
          + (f" (given; measured here {1e3 * measured_s:.1f})" if args.step_ms else " (measured)"))

    def t(point):
        return sim_time(point, step_s, LINK_BITS_PER_S, H)

    for length in lengths:
        dp_point = _at(results["data-parallel"], length)
        rows = []
        for arm in arms:
            pt = _at(results[arm["name"]], length)
            rows.append((arm["name"], f"{pt['loss']:.4f}", f"{100 * (pt['loss'] / dp_point['loss'] - 1):+.2f}%",
                         f"{length * batch * seq_len * K:,}", pt["syncs"], fmt_bytes(pt["bytes"]),
                         f"{dp_point['bytes'] / pt['bytes']:.0f}x", f"{t(pt):.1f}"))
        print_table(["arm", "held-out loss", "vs DP", "tokens", "syncs", "bytes/worker (sent+recv)",
                     "fewer bytes than DP", "sim. time @100Mbit/s (s)"], rows,
                    title=f"{length} steps per worker ({length // H} outer rounds)")
    target = max(_final(results["data-parallel"]), _final(results["DiLoCo fp32"]))
    hits = {a["name"]: next((pt for pt in results[a["name"]]["curve"] if pt["loss"] <= target), None) for a in arms}
    dp_time = t(hits["data-parallel"]) if hits["data-parallel"] else None
    rows = [(a["name"], h["step"] if h else "not reached", f"{t(h):.1f}" if h else "-",
             f"{dp_time / t(h):.1f}x" if h and dp_time else "-") for a in arms for h in [hits[a["name"]]]]
    print_table(["arm", "step reached", "sim. time (s)", "sooner than DP"], rows,
                title=f"time to held-out loss {target:.4f} over a simulated 100 Mbit/s link per worker")
    dp_link_per_step = results["data-parallel"]["curve"][0]["bytes"] / H * 8 / LINK_BITS_PER_S
    print(f"an arm that needs as many steps as DP and sends nothing is at most {1 + dp_link_per_step / step_s:.1f}x "
          f"sooner (compute {1e3 * step_s:.1f} ms, DP's link {1e3 * dp_link_per_step:.0f} ms per step)")
    if not args.quick:
        projection(arms, hits, family, batch, seq_len, args.projected_step_s)
    fp32_final = _final(results["DiLoCo fp32"])
    dp_bytes = results["data-parallel"]["curve"][-1]["bytes"]
    for arm in (a for a in arms if a["kind"] == "sparse"):  # the targets are the sparse arms'
        pt = results[arm["name"]]["curve"][-1]
        hit = hits[arm["name"]]
        print(f"{arm['name']}: loss {100 * (pt['loss'] / fp32_final - 1):+.2f}% vs DiLoCo fp32 [target <= 0]; "
              f"{dp_bytes / pt['bytes']:.0f}x fewer bytes than DP [target >= 1000x]; time to target "
              + (f"{dp_time / t(hit):.1f}x sooner than DP" if hit and dp_time else "not reached") + " [target >= 20x]")
    print(f"bench wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
