"""Fault drills with real processes: how long a run takes to recover from each fault.

    python -m bench.drills                                  # every drill, embedded default (SQLite)
    DATABASE_URL=postgres://... REDIS_URL=redis://... python -m bench.drills --drills celery-kill,web-kill
    python -m bench.drills --rounds 5 --fault-round 3
    python -m bench.drills --tick-s 10 --lease-s 30 --heartbeat-s 5   # the server's default timers

Each drill (``tests/e2e/drillkit.py``, the same scenarios ``pytest -m drill`` asserts on) starts gunicorn, a
Celery worker, Celery beat, ``agora-worker`` agents on the CPU and, when Redis is in use, a Redis of its own
on a spare port; trains a tiny byte-level GPT; injects its fault during round ``--fault-round``; and waits
for the run to end. Printed per drill: the recovery time (from the fault to the next committed round), the
fault-free round time of the same run (median over its other rounds, opened -> committed), how the run
ended, and whether every invariant held (exactly-once aggregation, credits at most once per task,
checkpoints matching their sha256, no dead attempt's blobs left, ledger verifies). Target: under 60 s for
the death of any single process.

Runs on a throwaway database (``bench.django_env``); with SQLite that is ``$AGORA_VAR_DIR/test.sqlite3``, so
do not run it beside a pytest session that uses the same ``AGORA_VAR_DIR``.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import traceback
from pathlib import Path

# Single process deaths with a prompt restart, for which the 60 s target holds. The others are a long
# outage (its recovery includes the 35 s the server is down) and degraded conditions whose recovery is
# bounded by the round deadline.
PROCESS_DEATHS = {"agent-kill", "celery-kill", "celery-child-kill", "web-kill", "redis-restart", "clock-skew",
                  "blob-write-kill"}
TARGET_S = 60.0


def main(argv=None) -> int:
    from tests.e2e.drillkit import DRILLS, DRILLS_BY_NAME

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drills", default=",".join(d.name for d in DRILLS),
                        help=f"comma-separated, of: {', '.join(DRILLS_BY_NAME)}")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--fault-round", type=int, default=3)
    parser.add_argument("--tick-s", type=int, default=1, help="AGORA_TRAINING_TICK_S (server default 10)")
    parser.add_argument("--lease-s", type=int, default=10, help="AGORA_AGGREGATION_LEASE_S (server default 30)")
    parser.add_argument("--heartbeat-s", type=int, default=1, help="AGORA_HEARTBEAT_INTERVAL_S (server default 30)")
    parser.add_argument("--keep", action="store_true", help="keep each drill's folder (logs, blobs)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.drills.split(",") if n.strip()]
    unknown = [n for n in names if n not in DRILLS_BY_NAME]
    if unknown:
        parser.error(f"unknown drills {unknown}; known: {', '.join(DRILLS_BY_NAME)}")
    if not 1 < args.fault_round <= args.rounds:
        parser.error("--fault-round must be after the first round and at most --rounds")

    from bench.django_env import throwaway_database

    with throwaway_database() as connection:
        from django.conf import settings
        from django.test import override_settings

        from bench.common import print_table
        from tests.e2e.drillkit import describe, missing_need, run_drill

        override_settings(PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"]).enable()
        base = Path(tempfile.mkdtemp(prefix="agora-drills-"))
        rows, failures = [], 0
        timers = {"AGORA_TRAINING_TICK_S": str(args.tick_s), "AGORA_AGGREGATION_LEASE_S": str(args.lease_s),
                  "AGORA_HEARTBEAT_INTERVAL_S": str(args.heartbeat_s)}
        for name in names:
            drill = DRILLS_BY_NAME[name]
            why_not = missing_need(drill)
            if why_not:
                rows.append((drill.title, "skipped", "", why_not, ""))
                continue
            started = time.monotonic()
            try:
                outcome = run_drill(drill, base / name, rounds=args.rounds, fault_round=args.fault_round,
                                    timers=timers)
            except Exception as exc:  # a stall: the drill's wait timed out
                failures += 1
                first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
                print(f"{name}: FAILED after {time.monotonic() - started:.0f} s: {first}", flush=True)
                if os.environ.get("AGORA_DRILL_TRACEBACK"):
                    traceback.print_exc()
                rows.append((drill.title, "no recovery", "", first[:120], "-"))
                continue
            print(describe(outcome), f"({time.monotonic() - started:.0f} s)", flush=True)
            for problem in outcome.problems:
                print("  problem:", problem, flush=True)
            for note in outcome.notes:
                print("  note:", note, flush=True)
            failures += bool(outcome.problems)
            recovery = outcome.recovery_s
            over = name in PROCESS_DEATHS and recovery is not None and recovery >= TARGET_S
            ended = outcome.run_status + (f" ({outcome.run_reason})" if outcome.run_reason else "")
            rows.append((drill.title, "-" if recovery is None else f"{recovery:.1f}" + (" (over target)" if over else ""),
                         "-" if outcome.round_s is None else f"{outcome.round_s:.1f}", ended,
                         "ok" if not outcome.problems else "; ".join(outcome.problems)[:160]))
        broker = "Redis (a server of each drill's own)" if settings.REDIS_URL else "filesystem broker"
        print(f"\nFault drills on {connection.vendor}, {broker}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); "
              f"{args.rounds} rounds of a 1-layer byte-level GPT (2 agents, 10 inner steps), fault in round "
              f"{args.fault_round}; training tick {args.tick_s} s, aggregation lease {args.lease_s} s, heartbeats "
              f"every {args.heartbeat_s} s. Recovery: fault -> next committed round; target < {TARGET_S:g} s for "
              f"one process death.\n")
        print_table(["drill", "recovery (s)", "fault-free round, median (s)", "run", "invariants"], rows)
        if not args.keep:
            import shutil

            shutil.rmtree(base, ignore_errors=True)
        return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
