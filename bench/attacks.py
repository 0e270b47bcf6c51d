"""Attacks on a round, through the server's own round code: k = 8 workers, 2 of them malicious.

    python -m bench.attacks                      # 10 rounds x H=50, int8, trimmed mean, every attack
    python -m bench.attacks --rounds 4 --inner-steps 20 --attacks noise,replay
    python -m bench.attacks --jobs 5 --threads 1  # the arms in 5 processes at once

Every round goes through ``diloco.round.outer_round`` (screen -> replay and score checks -> aggregate ->
outer step -> evaluation gate) with the contribution checks of ``diloco.contributions``, as
``training.services.aggregation`` calls them; updates travel int8-encoded as uploads do. For each attack:
the final held-out loss against an honest-only run (the 6 honest workers alone, measured in the same
invocation with the same seeds), the honest updates turned away, and how many attacker updates earned
credit (an update earns credit when it enters an accepted step). Attackers:

- scaled: its own honest update x10;  noise: Gaussian noise at 3x the honest median norm;  nan: NaNs;
- lie: "a little is enough" (Baruch et al. 2019): honest mean - 1.0 x honest std per coordinate;
- collude: both send the same update, opposite to the honest mean, at 4x the median norm;
- max-noise: noise at the largest norm (of 4.9x, 4x, 3x, 2x, 1.5x, 1x, 0.5x the median) screening lets in;
- free-riders: public-step (upload θ_{r−1} − θ_r from the public checkpoints; zeros in round 1),
  replay (honest in round 1, then that upload again), median-noise (noise at the median of the accepted
  norms the server's reference pools, over the last five accepted rounds, which the ledger publishes). Free-riders are counted from the round they stop working.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import subprocess
import sys
import time

import torch

from bench.common import print_table
from diloco.codecs import decode_update, encode_update, reference_of
from diloco.contributions import (
    ContributionCheck,
    add_trained_windows,
    check_contributions,
    other_keys,
    shard_windows,
    step_sketch,
)
from diloco.data import encode_documents, load_documents, shard_documents, split_documents
from diloco.evaluate import evaluate_loss
from diloco.inner import InnerConfig, inner_train
from diloco.models import build_model, init_state, model_with_weights
from diloco.replay import Earlier
from diloco.round import AggregatorSpec, Update, outer_round, reference_norms, screen

ATTACKS = ("none", "scaled", "noise", "nan", "lie", "collude", "max-noise", "public-step", "replay", "median-noise")
FREE_RIDERS = ("public-step", "replay", "median-noise")
MODEL = {"n_layer": 2, "n_embd": 64, "n_head": 4, "block_size": 64}


@dataclasses.dataclass
class Setup:
    rounds: int = 10
    inner_steps: int = 50
    workers: int = 8
    malicious: int = 2
    batch_size: int = 8
    seq_len: int = 64
    inner_lr: float = 3e-3
    score_windows: int = 32
    model: dict = dataclasses.field(default_factory=lambda: dict(MODEL))
    aggregator: str = "trimmed_mean"
    codec: str = "int8"
    seed: int = 0


@dataclasses.dataclass
class Outcome:
    attack: str
    final_loss: float
    honest_rejected: int
    honest_total: int
    attacker_credited: int
    attacker_total: int
    steps_rejected: int
    seconds: float
    reasons: dict


def _norm(u: dict) -> float:
    return math.sqrt(sum(float(v.float().norm()) ** 2 for v in u.values()))


def _noise(like: dict, norm: float, gen: torch.Generator) -> dict:
    noise = {k: torch.randn(v.shape, generator=gen) for k, v in like.items()}
    scale = norm / max(_norm(noise), 1e-30)
    return {k: v * scale for k, v in noise.items()}


def _data(setup: Setup):
    train, held = split_documents(load_documents("builtin:python-docs"), 0.1)
    shards = [encode_documents(shard_documents(train, i, setup.workers)) for i in range(setup.workers)]
    return shards, encode_documents(held)


def simulate(attack: str, setup: Setup, data=None) -> Outcome:
    """One run of ``setup.rounds`` rounds under ``attack`` (``none``: the honest workers alone)."""
    started = time.perf_counter()
    shards, held = data or _data(setup)
    k, m = setup.workers, setup.malicious
    honest_ids = list(range(k - m))
    attacker_ids = list(range(k - m, k)) if attack != "none" else []
    arch, cfg = "byte-gpt", setup.model
    params = init_state(arch, cfg, seed=setup.seed)
    ref = reference_of(params)
    inner = InnerConfig(steps=setup.inner_steps, lr=setup.inner_lr, batch_size=setup.batch_size,
                        seq_len=setup.seq_len, warmup=min(5, setup.inner_steps))
    outer_state = None
    earlier: list[Earlier] = []
    previous_norms: list[float] = []  # the pooled reference, as the server builds it (diloco.round.reference_norms)
    accepted_norms: list[list[float]] = []  # per accepted round, its accepted updates' norms
    previous_public: dict | None = None
    first_uploads: dict[int, bytes] = {}
    gen = torch.Generator().manual_seed(setup.seed + 99)
    sketch_seed = 424242
    stats = {"honest_rejected": 0, "honest_total": 0, "attacker_credited": 0, "attacker_total": 0,
             "steps_rejected": 0}
    reasons: dict[str, int] = {}

    def evaluate(state):
        return evaluate_loss(model_with_weights(arch, cfg, state), held, batch_size=8, seq_len=setup.seq_len,
                             batches=8)

    eval_before = None
    for r in range(1, setup.rounds + 1):
        honest = {}
        for w in honest_ids + ([i for i in attacker_ids if attack in ("scaled",) or (attack == "replay" and r == 1)]):
            model = build_model(arch, cfg)
            model.load_state_dict(params)
            honest[w] = inner_train(model, shards[w], inner, seed=_task_seed(r, w)).pseudo_gradient
        mean = {n: sum(honest[w][n] for w in honest_ids) / len(honest_ids) for n in params}
        median_norm = sorted(_norm(honest[w]) for w in honest_ids)[len(honest_ids) // 2]
        raw: dict[int, dict] = {w: honest[w] for w in honest_ids}
        for w in attacker_ids:
            if attack == "scaled":
                raw[w] = {n: 10 * v for n, v in honest[w].items()}
            elif attack == "noise":
                raw[w] = _noise(params, 3 * median_norm, gen)
            elif attack == "nan":
                raw[w] = {n: torch.full_like(v, float("nan")) for n, v in params.items()}
            elif attack == "lie":
                std = {n: torch.stack([honest[h][n] for h in honest_ids]).std(dim=0) for n in params}
                raw[w] = {n: mean[n] - 1.0 * std[n] for n in params}
            elif attack == "collude":
                scale = 4 * median_norm / max(_norm(mean), 1e-30)
                raw[w] = {n: -scale * v for n, v in mean.items()}
            elif attack == "max-noise":
                raw[w] = None  # chosen below, once the honest updates are known
            elif attack == "public-step":
                raw[w] = previous_public if previous_public is not None else {n: torch.zeros_like(v)
                                                                               for n, v in params.items()}
            elif attack == "replay":
                raw[w] = honest[w] if r == 1 else None
            elif attack == "median-noise":
                raw[w] = _noise(params, statistics_median(previous_norms) or median_norm, gen)
        if attack == "max-noise":
            for ratio in (4.9, 4.0, 3.0, 2.0, 1.5, 1.0, 0.5):
                trial = {w: _noise(params, ratio * median_norm, gen) for w in attacker_ids}
                probe = [Update(w, raw[w]) for w in honest_ids] + [Update(w, trial[w]) for w in attacker_ids]
                if all(v.accepted for v in screen(probe, previous_norms=previous_norms)[-m:]):
                    break
            raw.update(trial)
        uploads = {}
        for w in honest_ids + attacker_ids:
            if attack == "replay" and w in attacker_ids and r > 1:
                uploads[w] = first_uploads[w]
            elif attack == "nan" and w in attacker_ids:
                uploads[w] = b"nan:%d" % w  # the codec refuses NaN: these tensors go in as they are
            else:
                uploads[w] = encode_update(raw[w], setup.codec)
            if r == 1:
                first_uploads[w] = uploads[w]
        updates = [Update(w, raw[w] if uploads[w].startswith(b"nan:") else decode_update(uploads[w], ref))
                   for w in honest_ids + attacker_ids]
        ids = honest_ids + attacker_ids
        # Scored as the server scores: own windows are windows each task trained on (its seed), other windows
        # random windows of other shards, all picked by the round's secret seed.
        windows = shard_windows(dict(enumerate(shards)), count=setup.score_windows, seq_len=setup.seq_len,
                                seed=7919 * r + setup.seed, own=False)
        own = add_trained_windows(windows, {w: (w, _task_seed(r, w)) for w in ids}, dict(enumerate(shards)),
                                  steps=setup.inner_steps, batch_size=setup.batch_size, seq_len=setup.seq_len,
                                  count=setup.score_windows, seed=7919 * r + setup.seed)
        check = ContributionCheck(
            arch=arch, config=cfg, sketch_seed=sketch_seed, windows=windows, own=own,
            other={w: other_keys(w, k, windows) for w in ids}, public_step=previous_public,
            sha256={w: hashlib.sha256(uploads[w]).hexdigest() for w in uploads}, earlier=earlier)
        result = outer_round(base_state=params, updates=updates, evaluate=evaluate, outer_state=outer_state,
                             aggregator=AggregatorSpec(setup.aggregator), previous_norms=previous_norms,
                             eval_before=eval_before,
                             contributions=lambda ups, vs, c=check, p=params: check_contributions(p, ups, vs, c))
        for v in result.verdicts:
            if v.extra.get("sketch") is not None:
                earlier.append(Earlier(f"round {r} update {v.id}", v.extra["sketch"],
                                       hashlib.sha256(uploads[v.id]).hexdigest()))
            credited = v.credited(step_accepted=result.accepted)
            if v.id in honest_ids:
                stats["honest_total"] += 1
                if not v.accepted:
                    stats["honest_rejected"] += 1
                    reasons[f"honest: {v.code}"] = reasons.get(f"honest: {v.code}", 0) + 1
            elif not (attack == "replay" and r == 1):
                stats["attacker_total"] += 1
                stats["attacker_credited"] += int(credited)
                reasons[f"attacker: {v.code}"] = reasons.get(f"attacker: {v.code}", 0) + 1
        if result.accepted:
            s = step_sketch(params, result.new_state, seed=sketch_seed)
            if s is not None:
                earlier.append(Earlier(f"outer step of round {r}", s))
            previous_public = {n: params[n] - result.new_state[n] for n in params}
            accepted_norms.append([v.norm for v in result.verdicts if v.accepted and v.norm is not None])
            previous_norms = reference_norms(accepted_norms)
            params = result.new_state
            outer_state = result.optimizer.state_tensors()
            eval_before = result.eval_after
        else:
            stats["steps_rejected"] += 1
            eval_before = result.eval_before
    return Outcome(attack, evaluate(params), seconds=time.perf_counter() - started, reasons=reasons, **stats)


def _task_seed(r: int, w: int) -> int:
    return 1000 * r + w


def statistics_median(values: list[float]) -> float | None:
    values = sorted(v for v in values if v is not None and math.isfinite(v))
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _arm(attack: str, setup: Setup, data) -> dict:
    return dataclasses.asdict(simulate(attack, setup, data))


def _arms_in_processes(attacks: list[str], args, jobs: int) -> dict[str, dict]:
    """Every arm in its own ``python -m bench.attacks --json`` process, ``jobs`` at a time; the runs are
    deterministic, so an arm gives the same figures in any process."""
    chunks = [attacks[i::jobs] for i in range(jobs) if attacks[i::jobs]]
    procs = [subprocess.Popen([sys.executable, "-m", "bench.attacks", "--json", "--threads", str(args.threads),
                               "--rounds", str(args.rounds), "--inner-steps", str(args.inner_steps),
                               "--windows", str(args.windows), "--attacks", ",".join(chunk)],
                              stdout=subprocess.PIPE, text=True) for chunk in chunks]
    out = {}
    for proc in procs:
        stdout, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"an arm's process failed with exit code {proc.returncode}")
        for line in stdout.splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                out[row["attack"]] = row
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--inner-steps", type=int, default=50)
    ap.add_argument("--windows", type=int, default=32, help="scoring windows per shard (and of other shards)")
    ap.add_argument("--attacks", default=",".join(ATTACKS[1:]))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=1, help="arms run in this many processes at once")
    ap.add_argument("--json", action="store_true", help="print each arm's outcome as a JSON line (no table)")
    args = ap.parse_args(argv)
    attacks = [a for a in args.attacks.split(",") if a]
    for attack in attacks:
        if attack not in ATTACKS:
            raise SystemExit(f"unknown attack {attack!r} (known: {', '.join(ATTACKS[1:])})")
    torch.set_num_threads(args.threads)
    setup = Setup(rounds=args.rounds, inner_steps=args.inner_steps, score_windows=args.windows)
    if args.json:
        data = _data(setup)
        for attack in attacks:
            print(json.dumps(_arm(attack, setup, data)), flush=True)
        return
    print(f"byte-gpt {setup.model}, k={setup.workers} ({setup.malicious} malicious), {setup.rounds} rounds x "
          f"H={setup.inner_steps}, {setup.codec}, {setup.aggregator}, {setup.score_windows} scoring windows; "
          f"torch threads {torch.get_num_threads()} x {args.jobs} processes", flush=True)
    arms = ["none", *[a for a in attacks if a != "none"]]
    if args.jobs > 1:
        outcomes = _arms_in_processes(arms, args, args.jobs)
    else:
        data = _data(setup)
        outcomes = {}
        for attack in arms:
            outcomes[attack] = _arm(attack, setup, data)
            print(f"  {attack}: done ({outcomes[attack]['seconds']:.0f} s)", flush=True)
    base = outcomes["none"]
    rows = [("honest-only", f"{base['final_loss']:.4f}", "", f"{base['honest_rejected']}/{base['honest_total']}",
             "", str(base["steps_rejected"]), ", ".join(f"{k} {v}" for k, v in sorted(base["reasons"].items())),
             f"{base['seconds']:.0f}")]
    for attack in arms[1:]:
        out = outcomes[attack]
        delta = 100 * (out["final_loss"] - base["final_loss"]) / base["final_loss"]
        rows.append((attack, f"{out['final_loss']:.4f}", f"{delta:+.2f}%",
                     f"{out['honest_rejected']}/{out['honest_total']}",
                     f"{out['attacker_credited']}/{out['attacker_total']}", str(out["steps_rejected"]),
                     ", ".join(f"{k} {v}" for k, v in sorted(out["reasons"].items())), f"{out['seconds']:.0f}"))
    print_table(["attack", "final loss", "vs honest-only", "honest rejected", "attacker credited", "steps rejected",
                 "verdicts (attackers, honest rejections)", "s"], rows,
                title=f"honest-only final held-out loss {base['final_loss']:.4f}")


if __name__ == "__main__":
    main()
