"""Utilisation of one agent on a throttled link, with and without overlap, against a live server.

    python -m bench.overlap                       # the 25M byte-level GPT, 100 Mbit/s, 4 rounds per arm
    python -m bench.overlap --quick               # a tiny model, 3 rounds: a minute or two
    python -m bench.overlap --mbps 20 --rounds 6 --arms int8,topk2,topk2+overlap

One ``agora-worker run --max-mbps X`` agent (a token bucket per direction in its client) trains one run per
arm, one after another, against gunicorn + a Celery worker with beat on a throwaway database. Every arm has
the same model, data, settings and seeds; the arms differ only in compression and ``diloco.overlap``:

- ``int8``: dense int8 updates; every round the agent downloads the whole new checkpoint;
- ``topk2``: sparse 2-bit updates at 2% density with error feedback; the agent downloads only the published
  step of each round (``GET /api/v1/checkpoints/<sha>/delta``);
- ``topk2+overlap``: the same, and the agent trains ahead while its upload travels and the server
  aggregates (``workers.overlap``).

The server answers with its own polling interval (``poll_after_s``, 30 s unless ``--poll-s``), as volunteers
see it: an agent that waited that long for the next round after each result would show it here.

Utilisation is what the agent reports with each result: compute seconds (inner training, including steps
trained ahead) over wall seconds (from the end of its previous round's training to the end of this one's:
upload, aggregation, claim, download, data, training). Rounds after the first are counted (the first has no
previous round); the table gives the sum of compute over the sum of wall time and the per-round median,
and the bytes the agent sent and received per round. The baseline is the same agent in the same bench
without overlap. "Steps per wall s vs training alone" divides the baseline's compute seconds per round (H
steps with nothing else running on the agent's side) by each arm's round wall time: where the agent shares
its cores with the server (as on a one-machine bench), steps trained ahead run slower than alone, and the
utilisation counts those slower seconds as compute. Target: ≥ 95% with overlap at 100 Mbit/s on the 25M model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

MODEL_25M = {"n_layer": 8, "n_embd": 512, "n_head": 8, "block_size": 128}
MODEL_TINY = {"n_layer": 1, "n_embd": 32, "n_head": 4, "block_size": 32}
# The server's round timings (``Round.timings``) the bench reports, as medians per arm.
SERVER_TIMINGS = ("aggregation_s", "decode_s", "outer_step_s", "eval_after_s", "save_checkpoint_s", "save_outer_state_s")
ARMS = {"int8": ("int8", False), "topk2": ("topk2", False), "topk2+overlap": ("topk2", True)}


def _spec(name: str, model: dict, *, rounds: int, steps: int, batch: int, seq: int, compression: str,
          overlap: bool) -> dict:
    from governance.specs import spec_normalise

    sparse = compression.startswith("topk")
    return spec_normalise(kind="training", spec={
        "model": {"name": name, "arch": "byte-gpt", "init": "scratch", "config": model},
        "dataset": {"source": "builtin:python-docs", "heldout_fraction": 0.1},
        "diloco": {"rounds": rounds, "workers_per_round": 1, "min_workers": 1, "inner_steps": steps,
                   "inner_lr": 0.001, "batch_size": batch, "seq_len": seq, "warmup": 1, "compression": compression,
                   "aggregator": "mean", "round_timeout_s": 3600, "replica_fraction": 0.0, "overlap": overlap,
                   **({"outer_momentum": 0.0, "outer_lr": 1.0} if sparse else {})},
        "hardware": {"min_vram_mb": 0, "allow_cpu": True},
    })


def _start_run(spec: dict, procs) -> int:
    from django.contrib.auth import get_user_model

    from governance.models import Proposal
    from governance.specs import content_hash
    from tests.procs import wait_for
    from training.models import TrainingRun

    author = get_user_model().objects.create_user(f"bench-overlap-{time.time_ns()}", password=None)
    proposal = Proposal.objects.create(kind="training", status="approved", title=f"Overlap bench {spec['model']['name']}",
                                       author=author, spec=spec, content_hash=content_hash(spec))
    return wait_for(lambda: TrainingRun.objects.filter(proposal=proposal).first(), 300, interval=0.5,
                    what="the tick to start the run", procs=procs).pk


def _wait_finished(run_id: int, procs, timeout: float) -> str:
    from tests.procs import wait_for
    from training.models import TrainingRun

    def done():
        run = TrainingRun.objects.get(pk=run_id)
        return run.status if run.status in ("finished", "failed", "canceled") else None

    return wait_for(done, timeout, interval=1.0, what=f"run {run_id} to finish", procs=procs)


def _server_rows(run_id: int) -> dict:
    """Medians of the server's per-round timings (``Round.timings``) over the rounds counted."""
    from training.models import Round

    timings = [r.timings for r in Round.objects.filter(run_id=run_id, index__gt=1).exclude(timings={})]
    return {k: statistics.median(t.get(k, 0.0) for t in timings) for k in SERVER_TIMINGS} if timings else {}


def _arm_rows(run_id: int) -> dict:
    from training.models import Task

    rows = []
    for t in Task.objects.filter(round__run_id=run_id, update_sha256__gt="").order_by("round__index", "id"):
        m = t.metrics or {}
        if "wall_seconds" in m:
            rows.append((t.round.index, m))
    later = [m for index, m in rows if index > 1]
    if not later:
        return {}
    compute, wall = sum(m["compute_seconds"] for m in later), sum(m["wall_seconds"] for m in later)
    return {
        "rounds": len(later),
        "utilisation": compute / wall if wall else float("nan"),
        "median": statistics.median(m["compute_seconds"] / m["wall_seconds"] for m in later),
        "round_s": statistics.median(m["wall_seconds"] for m in later),
        "compute_s": statistics.median(m["compute_seconds"] for m in later),
        "sent": statistics.median(m.get("bytes_sent", 0) for m in later),
        "received": statistics.median(m.get("bytes_received", 0) for m in later),
        "via": ",".join(sorted({m.get("checkpoint_via", "?") for m in later})),
        "ahead": statistics.median(m.get("overlap_steps", 0) for m in later),
        "server": _server_rows(run_id),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and 3 rounds per arm")
    parser.add_argument("--mbps", type=float, default=100.0, help="the agent's --max-mbps (default 100)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per arm (default 4; quick 3)")
    parser.add_argument("--steps", type=int, default=None, help="inner steps H (default 8; quick 20)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of: {', '.join(ARMS)}")
    parser.add_argument("--poll-s", type=int, default=30,
                        help="the server's poll_after_s (AGORA_HEARTBEAT_INTERVAL_S; default 30, the server's own)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, blobs)")
    args = parser.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if any(a not in ARMS for a in arms):
        parser.error(f"--arms must be of {', '.join(ARMS)}")
    model = MODEL_TINY if args.quick else MODEL_25M
    rounds = args.rounds or (3 if args.quick else 4)
    steps = args.steps or (20 if args.quick else 8)
    batch, seq = (8, 32) if args.quick else (4, 64)

    from bench.django_env import throwaway_database

    with throwaway_database():
        from django.test import override_settings

        from bench.common import print_table
        from marketplace.services import enrollment_token_create, worker_enroll
        from tests.factories import UserFactory
        from tests.procs import BIN, Proc, celery_worker, child_env, free_port, gunicorn, http_ok, wait_for
        from workers import config as cfgmod

        override_settings(PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"]).enable()
        work = Path(tempfile.mkdtemp(prefix="agora-overlap-"))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = child_env(url, AGORA_VAR_DIR=str(work / "var"), AGORA_MEDIA_ROOT=str(work / "media"),
                        AGORA_CHECKPOINT_STORAGE="filesystem", AGORA_CACHE_PREFIX=f"bench-overlap-{os.getpid()}",
                        AGORA_TRAINING_TICK_S="1", AGORA_HEARTBEAT_INTERVAL_S=str(args.poll_s), AGORA_CLOSE_EVERY_S="5",
                        AGORA_SWEEP_EVERY_S="2", AGORA_RATE_HEARTBEAT="100000/min",
                        AGORA_RATE_CLAIM_WORKER="100000/min", AGORA_RATE_CLAIM_ADDRESS="100000/min",
                        # The web, Celery and the agent share the machine: one torch thread each keeps them from
                        # spinning against each other (and the agent's threads from each other).
                        OMP_NUM_THREADS="1")
        env.pop("CELERY_BROKER_URL", None)
        env.pop("REDIS_URL", None)  # the filesystem broker: no Redis database shared with anyone
        procs = []
        results = {}
        try:
            procs.append(gunicorn(env, work / "web.log", port))
            wait_for(lambda: http_ok(f"{url}/api/v1/ledger/head"), 120, interval=0.2, what="gunicorn",
                     procs=procs)
            procs.append(celery_worker(env, work / "celery.log", beat=True))
            secret = worker_enroll(
                enrollment_token=enrollment_token_create(owner=UserFactory(), name="bench").token, name="bench",
                hardware={"gpus": [], "cpu_count": os.cpu_count() or 1, "memory_mb": 4096, "torch": "2",
                          "cuda": None},
                benchmark={"tflops": 0.1, "mem_gbps": 5.0}, agent_version="bench")
            path = work / "agent" / "worker.json"
            cfgmod.save_config(cfgmod.WorkerConfig(server=url, worker_id=secret.record.pk, worker_token=secret.token,
                                                   name="bench", path=path))
            agent_env = {**env, "AGORA_WORKER_CONFIG": str(path), "AGORA_WORKER_CACHE": str(work / "agent" / "cache")}
            procs.append(Proc([str(BIN / "agora-worker"), "run", "--allow-cpu", "--max-mbps", f"{args.mbps:g}"],
                              agent_env, work / "agent.log"))
            for arm in arms:
                compression, overlap = ARMS[arm]
                spec = _spec(f"bench-overlap-{arm.replace('+', '-')}-{time.time_ns()}", model, rounds=rounds,
                             steps=steps, batch=batch, seq=seq, compression=compression, overlap=overlap)
                started = time.monotonic()
                run_id = _start_run(spec, procs)
                status = _wait_finished(run_id, procs, timeout=3600)
                results[arm] = {**_arm_rows(run_id), "status": status, "total_s": time.monotonic() - started}
                print(f"{arm}: run {run_id} {status} in {results[arm]['total_s']:.0f} s", flush=True)
        finally:
            for proc in reversed(procs):
                proc.stop()
            if not args.keep:
                import shutil

                shutil.rmtree(work, ignore_errors=True)
            else:
                print(f"work folder: {work}")

        baseline = results.get("topk2") or {}
        rows = []
        for arm in arms:
            r = results[arm]
            if "utilisation" not in r:
                rows.append((arm, r["status"], "", "", "", "", "", "", "", "", ""))
                continue
            vs = r["utilisation"] / baseline["utilisation"] if baseline.get("utilisation") else float("nan")
            # Steps per wall second against the rate of training alone (the baseline's compute seconds): what
            # the agent trains in a round, whatever the steps trained ahead lost to sharing the cores.
            rate = baseline["compute_s"] / r["round_s"] if baseline.get("compute_s") else float("nan")
            rows.append((arm, r["rounds"], f"{100 * r['utilisation']:.1f}%", f"{100 * r['median']:.1f}%", vs,
                         f"{100 * rate:.1f}%", r["round_s"], r["compute_s"], r["ahead"],
                         f"{r['sent'] / 1e6:.3g} MB / {r['received'] / 1e6:.3g} MB", r["via"]))
        print_table(["arm", "rounds", "utilisation (Σcompute/Σwall)", "median per round", "× topk2",
                     "steps per wall s vs training alone", "round wall s (median)", "compute s", "steps ahead",
                     "sent / received per round", "checkpoint via"], rows,
                    title=f"One agent, {'tiny' if args.quick else '25M'} byte-GPT, H={steps}, {args.mbps:g} Mbit/s "
                          f"each way, poll_after_s {args.poll_s}, rounds 2..{rounds} (target: ≥ 95% with overlap)")
        print_table(["arm", *SERVER_TIMINGS], [(arm, *(results[arm].get("server", {}).get(k, float("nan"))
                                                     for k in SERVER_TIMINGS))
                                     for arm in arms if results[arm].get("server")],
                    title="The server's round: median seconds (Round.timings; aggregation_s is the whole attempt)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
