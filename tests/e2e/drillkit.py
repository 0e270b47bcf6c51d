"""Fault drills with real processes: a small Agora (gunicorn, a Celery worker, Celery beat, agents, and a Redis
of the drill's own when Redis is in use) trains a tiny model for a few rounds while one fault is injected.

``run_drill`` is shared by ``tests/e2e/test_fault_drills.py`` (which asserts the invariants) and
``bench/drills.py`` (which prints the recovery times). It needs Django set up on a database the child
processes can reach (pytest-django's test database, or ``bench.django_env.throwaway_database``).

Every drill follows the same script: start everything, let the rounds before ``fault_round`` commit
fault-free, inject the fault during ``fault_round``, then wait for the run to end. Measured: the recovery
time (from the fault to the next committed round) and the fault-free round time (opened -> committed) of
the other rounds of the same run. Checked (``Outcome.problems``): the run finished, or failed with a
stated reason; every round was aggregated exactly once (one ``round.aggregated``/``round.rejected`` ledger
entry per round index); credits at most once per task and only for accepted tasks; every committed
checkpoint's file matches its sha256 and size; no outer-optimizer blob of a dead attempt is left behind;
``ledger_verify()`` passes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tests.procs import (
    BIN,
    CpuThrottle,
    Proc,
    celery_beat,
    celery_worker,
    child_env,
    free_port,
    gunicorn,
    http_ok,
    wait_for,
)

FAULTPOINT = [sys.executable, "-m", "tests.e2e.faultpoint"]
LIBFAKETIME = next((p for p in ("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
                                "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
                                "/usr/lib/faketime/libfaketimeMT.so.1",
                                "/usr/local/lib/faketime/libfaketimeMT.so.1") if os.path.exists(p)), None)

MODEL = {"n_layer": 1, "n_embd": 32, "n_head": 4, "block_size": 32}
# The server's timers in the drills: a training tick every second, a 10 s aggregation lease (the server's
# defaults are 10 s and 30 s) and 1 s heartbeats, so that a recovery is not mostly waiting. The benchmark
# can run with other values (``bench.drills --tick-s --lease-s --heartbeat-s``).
DRILL_TIMERS = {"AGORA_TRAINING_TICK_S": "1", "AGORA_AGGREGATION_LEASE_S": "10", "AGORA_HEARTBEAT_INTERVAL_S": "1"}
# How long, after the fault, the faulted round may take to commit before the drill calls it a stall.
RECOVERY_LIMIT_S = float(os.environ.get("AGORA_DRILL_RECOVERY_LIMIT_S", "120"))


@dataclass
class Drill:
    """One scenario. ``fault`` runs during ``fault_round`` and returns the moment of the fault (epoch s)."""

    name: str
    title: str
    fault: Callable[[Cluster], float]
    agents: int = 2
    workers_per_round: int = 2
    min_workers: int = 2
    round_timeout_s: int = 30
    celery_pool: str = "solo"
    fault_at: str = ""  # a point of tests/e2e/faultpoint.py: aggregation, blob-write (Celery), upload (web),
    #                     task (agent 0)
    own_redis: bool = False  # always run a Redis of the drill's own (else only when REDIS_URL is set)
    agent_env: dict[int, dict[str, str]] = field(default_factory=dict)
    needs: str = ""  # "faketime", "redis-server": what the machine must have
    outage_s: float = 0.0  # how long a killed server stays down before its supervisor starts it again
    prepare: Callable[[Cluster], None] | None = None  # runs before ``fault_round`` opens
    extra_problems: Callable[[Cluster], list[str]] | None = None


@dataclass
class Outcome:
    drill: str
    run_status: str
    run_reason: str
    rounds: list[dict]
    fault_at: float
    recovery_s: float | None
    round_s: float | None
    problems: list[str]
    notes: list[str]


class Cluster:
    """The processes of one drill and the handles a fault needs."""

    def __init__(self, drill: Drill, workdir: Path, rounds: int, fault_round: int, timers: dict[str, str]):
        from django.conf import settings

        self.drill, self.workdir, self.rounds, self.fault_round = drill, workdir, rounds, fault_round
        self.media = workdir / "media"
        self.blob_root = self.media / "checkpoints"
        self.arm_file, self.hit_file = workdir / "fault.arm", workdir / "fault.hit"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.redis = None
        redis_url = ""
        if drill.own_redis or settings.REDIS_URL:
            from tests.redisproc import RedisProc

            self.redis = RedisProc().start()
            redis_url = self.redis.url
        env = child_env(
            self.url,
            AGORA_VAR_DIR=str(workdir / "var"),  # the filesystem broker and file cache of this drill only
            AGORA_MEDIA_ROOT=str(self.media),
            AGORA_CHECKPOINT_STORAGE="filesystem",
            AGORA_CACHE_PREFIX=f"drill-{drill.name}",
            AGORA_CLOSE_EVERY_S="5", AGORA_SWEEP_EVERY_S="2",
            AGORA_RATE_HEARTBEAT="100000/min", AGORA_RATE_CLAIM_WORKER="100000/min",
            AGORA_RATE_CLAIM_ADDRESS="100000/min",
            DJANGO_LOG_LEVEL="INFO",
            **{**DRILL_TIMERS, **timers},
            # Half a dozen processes share the machine's cores; one torch thread each keeps them from
            # spinning against each other.
            OMP_NUM_THREADS="1",
        )
        env.pop("CELERY_BROKER_URL", None)
        if redis_url:
            env["REDIS_URL"] = redis_url
        else:
            env.pop("REDIS_URL", None)
        self.env = env
        self.web: Proc | None = None
        self.celery: Proc | None = None
        self.beat: Proc | None = None
        self.agents: dict[int, Proc] = {}
        self.agent_envs: dict[int, dict[str, str]] = {}
        self.worker_ids: dict[int, int] = {}
        self.throttles: list[CpuThrottle] = []
        self.run_id: int | None = None
        self.web_starts = 0
        self.problems: list[str] = []  # found while the fault was injected

    # --- processes ------------------------------------------------------------------------------

    def _fault_env(self, point: str) -> dict[str, str]:
        return {"AGORA_FAULT_AT": point, "AGORA_FAULT_ROOT": str(self.blob_root),
                "AGORA_FAULT_ARM": str(self.arm_file), "AGORA_FAULT_HIT": str(self.hit_file)}

    def start_web(self) -> None:
        faulty = self.drill.fault_at == "upload"
        env = {**self.env, **(self._fault_env("upload") if faulty else {})}
        self.web = gunicorn(env, self.workdir / "web.log", self.port, prefix=FAULTPOINT if faulty else None)
        self.web_starts += 1
        wait_for(lambda: http_ok(f"{self.url}/api/v1/ledger/head"), 120, interval=0.2,
                 what="gunicorn to answer", procs=[self.web])

    def start_celery(self) -> None:
        faulty = self.drill.fault_at in ("aggregation", "blob-write")
        env = {**self.env, **(self._fault_env(self.drill.fault_at) if faulty else {})}
        self.celery = celery_worker(env, self.workdir / "celery.log", pool=self.drill.celery_pool,
                                    prefix=FAULTPOINT if faulty else None)

    def start_agent(self, index: int) -> Proc:
        env = self.agent_envs[index]
        program = [str(BIN / "agora-worker")]
        if self.drill.fault_at == "task" and index == 0:
            env = {**env, **self._fault_env("task"), "AGORA_FAULT_ROOT": env["AGORA_WORKER_CACHE"]}
            program = [*FAULTPOINT, "agora-worker"]
        proc = Proc([*program, "run", "--allow-cpu"], env, self.workdir / f"agent-{index}.log")
        self.agents[index] = proc
        return proc

    def enroll_agent(self, index: int) -> None:
        from marketplace.services import enrollment_token_create, worker_enroll
        from tests.factories import UserFactory
        from workers import config as cfgmod

        name = f"{self.drill.name}-agent-{index}"
        secret = worker_enroll(
            enrollment_token=enrollment_token_create(owner=UserFactory(), name=name).token, name=name,
            hardware={"gpus": [], "cpu_count": 2, "memory_mb": 4096, "torch": "2", "cuda": None},
            benchmark={"tflops": 0.1, "mem_gbps": 5.0}, agent_version="drill")
        path = self.workdir / name / "worker.json"
        cfgmod.save_config(cfgmod.WorkerConfig(server=self.url, worker_id=secret.record.pk,
                                               worker_token=secret.token, name=name, path=path))
        self.worker_ids[index] = secret.record.pk
        self.agent_envs[index] = {**self.env, "AGORA_WORKER_CONFIG": str(path),
                                  "AGORA_WORKER_CACHE": str(self.workdir / name / "cache"),
                                  **self.drill.agent_env.get(index, {})}

    def procs(self) -> list[Proc]:
        return [p for p in (self.web, self.celery, self.beat, *self.agents.values()) if p is not None]

    def start(self) -> None:
        self.blob_root.mkdir(parents=True, exist_ok=True)
        self.start_web()
        self.start_celery()
        self.beat = celery_beat(self.env, self.workdir / "beat.log")
        for index in range(self.drill.agents):
            self.enroll_agent(index)
            self.start_agent(index)
        self.run_id = self._create_run()

    def stop(self) -> None:
        for throttle in self.throttles:
            throttle.stop()
        for proc in reversed(self.procs()):
            proc.stop()
        if self.redis is not None:
            self.redis.cleanup()

    def _create_run(self) -> int:
        """An approved training proposal; the beat's tick turns it into the run (in the Celery worker)."""
        from django.contrib.auth import get_user_model

        from governance.models import Proposal
        from governance.specs import content_hash, spec_normalise
        from training.models import TrainingRun

        d = self.drill
        spec = spec_normalise(kind="training", spec={
            "model": {"name": f"drill-{d.name}-{os.getpid()}-{time.time_ns()}", "arch": "byte-gpt",
                      "init": "scratch", "config": MODEL},
            "dataset": {"source": "builtin:python-docs", "heldout_fraction": 0.1},
            "diloco": {"rounds": self.rounds, "workers_per_round": d.workers_per_round,
                       "min_workers": d.min_workers, "inner_steps": 10, "inner_lr": 0.003, "batch_size": 8,
                       "seq_len": 32, "warmup": 2, "compression": "int8", "aggregator": "mean",
                       "round_timeout_s": d.round_timeout_s},
            "hardware": {"min_vram_mb": 0, "allow_cpu": True},
        })
        author = get_user_model().objects.create_user(f"drill-{d.name}-{time.time_ns()}", password=None)
        proposal = Proposal.objects.create(kind="training", status="approved", title=f"Fault drill: {d.title}",
                                           author=author, spec=spec, content_hash=content_hash(spec))
        run = wait_for(lambda: TrainingRun.objects.filter(proposal=proposal).first(), 180, interval=0.5,
                       what="the tick to start the run", procs=self.procs())
        return run.pk

    # --- what faults use ------------------------------------------------------------------------

    def round_row(self, index: int):
        from training.models import Round

        return Round.objects.filter(run_id=self.run_id, index=index).first()

    def wait_round_open(self, index: int, timeout: float = 240):
        from training.models import Round

        return wait_for(lambda: Round.objects.filter(run_id=self.run_id, index=index).first(), timeout,
                        interval=0.2, what=f"round {index} to open", procs=self.procs())

    def wait_task_assigned(self, agent: int, round_index: int, timeout: float = 120):
        from training.models import Task

        return wait_for(lambda: Task.objects.filter(round__run_id=self.run_id, round__index=round_index,
                                                    worker_id=self.worker_ids[agent], status="assigned").first(),
                        timeout, interval=0.1, what=f"agent {agent} to hold a task of round {round_index}",
                        procs=self.procs())

    def wait_result_in(self, agent: int, round_index: int, timeout: float = 240):
        from training.models import Task

        return wait_for(lambda: Task.objects.filter(round__run_id=self.run_id, round__index=round_index,
                                                    worker_id=self.worker_ids[agent],
                                                    status__in=["completed", "accepted", "rejected"]).first(),
                        timeout, interval=0.1, what=f"agent {agent}'s result for round {round_index}",
                        procs=self.procs())

    def arm(self) -> None:
        self.arm_file.write_text("armed")

    def wait_hit(self, timeout: float = 120) -> int:
        """The pid that stopped itself at the fault point (see ``faultpoint.py``)."""
        def hit():
            text = self.hit_file.read_text() if self.hit_file.exists() else ""
            return int(text.split()[0]) if text.endswith("\n") else None

        return wait_for(hit, timeout, interval=0.05, what=f"the {self.drill.fault_at} fault point",
                        procs=self.procs())

    def throttle(self, agent: int, share: float) -> CpuThrottle:
        throttle = CpuThrottle(self.agents[agent].pid, share)
        throttle.start()
        self.throttles.append(throttle)
        return throttle


# --- the faults ---------------------------------------------------------------------------------


def arm_agent_task_point(c: Cluster) -> None:
    """A tiny model's task takes the agent well under a second, and it claims within a second of the round
    opening; so its fault point is armed as soon as its result for the round before is in."""
    c.wait_result_in(0, c.fault_round - 1)
    c.arm()


def kill_agent_mid_task(c: Cluster) -> float:
    """kill -9 an agent mid-task (it has claimed its task and is saving the round's checkpoint into its
    cache); its supervisor starts it again at once."""
    pid = c.wait_hit()  # armed by arm_agent_task_point
    assert pid == c.agents[0].pid, (pid, c.agents[0].pid)
    task = c.wait_task_assigned(0, c.fault_round, timeout=10)
    c.agents[0].kill()
    at = time.time()
    task.refresh_from_db()
    if task.status != "assigned":
        c.problems.append(f"the kill missed: task {task.pk} was already {task.status} when the agent died")
    c.start_agent(0)
    return at


def kill_celery_worker_mid_aggregation(c: Cluster) -> float:
    """kill -9 the Celery worker while it aggregates (it is reading the uploads); it is restarted at once."""
    c.arm()
    pid = c.wait_hit()
    assert pid == c.celery.pid, (pid, c.celery.pid)
    c.celery.kill()
    at = time.time()
    c.start_celery()
    return at


def kill_celery_pool_child_mid_aggregation(c: Cluster) -> float:
    """kill -9 only the prefork pool child that aggregates; the worker's main process stays up."""
    c.arm()
    pid = c.wait_hit()
    assert pid != c.celery.pid, "the aggregation ran in the main process, not a pool child"
    os.kill(pid, signal.SIGKILL)
    return time.time()


def kill_celery_mid_blob_write(c: Cluster) -> float:
    """kill -9 the Celery worker when it has just created the new checkpoint's file and written none of it."""
    return kill_celery_worker_mid_aggregation(c)


def kill_web_during_upload(c: Cluster) -> float:
    """kill -9 gunicorn (master and workers) while it stores an upload; it comes back after ``outage_s``."""
    c.arm()
    c.wait_hit()
    c.arm_file.unlink()
    c.web.kill()
    at = time.time()
    time.sleep(c.drill.outage_s)
    c.start_web()
    return at


def kill_and_restart_redis(c: Cluster) -> float:
    """kill -9 the drill's Redis (broker and cache) as soon as the fault round is open, while the agents
    claim, train and upload its tasks; it comes back empty after ``outage_s``. (Waiting to see an agent hold
    a task first could miss the round: a round of the tiny model is over in well under a second.)"""
    c.redis.kill()
    at = time.time()
    time.sleep(c.drill.outage_s)
    c.redis.start()
    return at


# A task of the drills' tiny model costs a fraction of a CPU-second here, so "too slow for a 30 s deadline"
# means a CPU a thousand times slower than this one.
SLOW_SHARE = 0.001


def slow_down_agent(c: Cluster) -> None:
    """Once its result for the round before is in, agent 2 may use 0.1% of a CPU (held stopped whenever it
    is ahead of that budget, as ``cpulimit`` does). Throttling it only once it holds its task would come too
    late: a task of the tiny model takes it a fraction of a second."""
    c.wait_result_in(2, c.fault_round - 1)
    c.throttle(2, SLOW_SHARE)


def slow_agent_cpu(c: Cluster) -> float:
    """The slowed agent claims a task of the fault round (the fault: from then on the round waits on a CPU
    far too slow for the deadline); the throttle is lifted once the round commits."""
    from training.models import Task

    task = c.wait_task_assigned(2, c.fault_round, timeout=60)
    at = task.claimed_at.timestamp()
    wait_for(lambda: (r := c.round_row(c.fault_round)) is not None and r.aggregated_at is not None,
             RECOVERY_LIMIT_S, interval=0.5, what=f"round {c.fault_round} to commit without the slow agent",
             procs=c.procs())
    for throttle in c.throttles:
        throttle.stop()
    task.refresh_from_db()
    if task.status not in (Task.Status.EXPIRED, Task.Status.FAILED):
        c.problems.append(f"the slow agent's task {task.pk} ended {task.status}: it was not too slow after all")
    return at


def kill_skewed_agent_mid_task(c: Cluster) -> float:
    """Agent 0's clock runs an hour ahead (agent 1's an hour behind). kill -9 agent 0 mid-task and start it
    again: by its own clock the task's deadline passed long ago, so only server time tells it to report."""
    return kill_agent_mid_task(c)


def _web_5xx_on_worker_calls(c: Cluster) -> list[str]:
    log = (c.workdir / "web.log").read_text(errors="replace")
    bad = [line.strip() for line in log.splitlines()
           if line.startswith("ACCESS ") and ("/api/v1/workers/" in line or "/api/v1/tasks/" in line)
           and line.rsplit(" ", 1)[-1].startswith("5")]
    return [f"worker calls answered 5xx during the Redis outage: {bad[:5]} ({len(bad)} in all)"] if bad else []


DRILLS = [
    Drill("agent-kill", "kill -9 an agent mid-task (restarted)", kill_agent_mid_task, fault_at="task",
          prepare=arm_agent_task_point),
    Drill("celery-kill", "kill -9 the Celery worker mid-aggregation (restarted)",
          kill_celery_worker_mid_aggregation, fault_at="aggregation"),
    Drill("celery-child-kill", "kill -9 the Celery pool child mid-aggregation",
          kill_celery_pool_child_mid_aggregation, fault_at="aggregation", celery_pool="prefork"),
    Drill("web-kill", "kill -9 gunicorn during an upload (restarted after 2 s)", kill_web_during_upload,
          fault_at="upload", outage_s=2),
    # Down longer than the uploading task had left: its result comes too late, the task expires, and the
    # round needs its agents to take replacement tasks in a round where they already held one.
    Drill("web-outage", "kill -9 gunicorn during an upload, down 35 s (past the 30 s task deadline)",
          kill_web_during_upload, fault_at="upload", outage_s=35),
    Drill("redis-restart", "kill -9 Redis, broker and cache (back empty after 5 s)",
          kill_and_restart_redis, own_redis=True, needs="redis-server", extra_problems=_web_5xx_on_worker_calls,
          outage_s=5),
    Drill("slow-cpu", f"an agent at {SLOW_SHARE:.1%} of a CPU, too slow for the 30 s deadline", slow_agent_cpu,
          agents=3, workers_per_round=3, min_workers=2, round_timeout_s=30, prepare=slow_down_agent),
    Drill("clock-skew", "agent clocks 1 h ahead and 1 h behind; the fast one kill -9'd mid-task (restarted)",
          kill_skewed_agent_mid_task, needs="faketime", fault_at="task", prepare=arm_agent_task_point,
          agent_env={0: {"LD_PRELOAD": LIBFAKETIME or "", "FAKETIME": "+3600", "FAKETIME_DONT_FAKE_MONOTONIC": "1",
                         "FAKETIME_DONT_RESET": "1"},
                     1: {"LD_PRELOAD": LIBFAKETIME or "", "FAKETIME": "-3600", "FAKETIME_DONT_FAKE_MONOTONIC": "1",
                         "FAKETIME_DONT_RESET": "1"}}),
    Drill("blob-write-kill", "kill -9 the Celery worker mid-checkpoint-write (restarted)", kill_celery_mid_blob_write,
          fault_at="blob-write"),
]
DRILLS_BY_NAME = {d.name: d for d in DRILLS}


def missing_need(drill: Drill) -> str:
    """Why this machine cannot run the drill, or ''."""
    if drill.needs == "faketime" and LIBFAKETIME is None:
        return "libfaketime is not installed (apt-get install -y faketime)"
    if (drill.needs == "redis-server" or drill.own_redis) and shutil.which("redis-server") is None:
        return "redis-server is not installed"
    return ""


# --- the script every drill follows -------------------------------------------------------------


def run_drill(drill: Drill, workdir: Path, *, rounds: int = 3, fault_round: int = 2, finish_timeout: float = 300,
              timers: dict[str, str] | None = None) -> Outcome:
    from training.models import TrainingRun

    workdir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(drill, workdir, rounds, fault_round, timers or {})
    try:
        cluster.start()
        if drill.prepare is not None:
            drill.prepare(cluster)
        cluster.wait_round_open(fault_round)
        fault_at = drill.fault(cluster)

        def recovered():
            r = cluster.round_row(fault_round)
            run = TrainingRun.objects.get(pk=cluster.run_id)
            return (r is not None and r.aggregated_at is not None) or run.status in ("failed", "canceled")

        wait_for(recovered, max(0.0, fault_at + RECOVERY_LIMIT_S - time.time()), interval=0.5,
                 what=f"round {fault_round} to commit within {RECOVERY_LIMIT_S:g} s of the fault ({drill.title})",
                 procs=cluster.procs())
        wait_for(lambda: TrainingRun.objects.get(pk=cluster.run_id).status in ("finished", "failed", "canceled"),
                 finish_timeout, interval=0.5, what="the run to end", procs=cluster.procs())
        return _outcome(cluster, fault_at)
    finally:
        cluster.stop()


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def _outcome(c: Cluster, fault_at: float) -> Outcome:
    from training.models import Round, TrainingRun

    run = TrainingRun.objects.get(pk=c.run_id)
    rows = list(Round.objects.filter(run=run).order_by("index"))
    rounds = [{"index": r.index, "status": r.status, "opened_at": _ts(r.opened_at),
               "aggregated_at": _ts(r.aggregated_at), "reason": r.reason} for r in rows]
    after = [r["aggregated_at"] for r in rounds if r["aggregated_at"] is not None and r["aggregated_at"] >= fault_at]
    recovery = min(after) - fault_at if after else None
    clean = [r["aggregated_at"] - r["opened_at"] for r in rounds
             if r["index"] != c.fault_round and r["aggregated_at"] is not None and r["opened_at"] < r["aggregated_at"]
             and not (r["opened_at"] <= fault_at <= r["aggregated_at"])]
    problems, notes = check_invariants(c)
    problems = c.problems + problems
    if c.drill.extra_problems is not None:
        problems += c.drill.extra_problems(c)
    return Outcome(drill=c.drill.name, run_status=run.status, run_reason=run.reason, rounds=rounds, fault_at=fault_at,
                   recovery_s=recovery, round_s=statistics.median(clean) if clean else None, problems=problems,
                   notes=notes)


def check_invariants(c: Cluster) -> tuple[list[str], list[str]]:
    """What must hold after any fault; returns (problems, notes)."""
    from django.db.models import Count

    from ledger.models import Entry
    from ledger.selectors import ledger_verify
    from marketplace.models import CreditGrant
    from training.models import Checkpoint, Round, Task, TrainingRun, checkpoint_storage_name

    problems: list[str] = []
    notes: list[str] = []
    run = TrainingRun.objects.get(pk=c.run_id)
    if run.status == TrainingRun.Status.FAILED:
        if not run.reason.strip():
            problems.append("the run failed without a stated reason")
    elif run.status != TrainingRun.Status.FINISHED:
        problems.append(f"the run ended {run.status}, not finished: {run.reason}")
    rounds = {r.index: r for r in Round.objects.filter(run=run)}
    if run.status == TrainingRun.Status.FINISHED:
        missing = sorted(set(range(1, run.total_rounds + 1)) - set(rounds))
        if missing:
            problems.append(f"the run finished without rounds {missing}")
        open_rounds = [i for i, r in rounds.items() if r.status in ("open", "aggregating")]
        if open_rounds:
            problems.append(f"the run finished with rounds {open_rounds} still open or aggregating")

    # Exactly once: one round.aggregated or round.rejected entry per round index, and one for every round
    # that says it was aggregated.
    entries = Entry.objects.filter(action__in=["round.aggregated", "round.rejected"], subject=run.ledger_subject)
    per_round: dict[int, list[str]] = {}
    for entry in entries:
        per_round.setdefault(int(entry.payload["round"]), []).append(entry.action)
    for index, actions in sorted(per_round.items()):
        if len(actions) != 1:
            problems.append(f"round {index} was aggregated {len(actions)} times: {actions}")
    for index, r in sorted(rounds.items()):
        if r.status in ("done", "rejected") and len(per_round.get(index, [])) != 1:
            problems.append(f"round {index} is {r.status} with {len(per_round.get(index, []))} ledger entries")

    # Credits: at most one grant per task, and only for accepted tasks of this run.
    tasks = {t.pk: t for t in Task.objects.filter(round__run=run)}
    refs = [f"task:{pk}" for pk in tasks]
    for ref, n in (CreditGrant.objects.filter(reference__in=refs).values_list("reference")
                   .annotate(n=Count("id")).values_list("reference", "n")):
        task = tasks[int(ref.split(":")[1])]
        if n > 1:
            problems.append(f"{ref} was credited {n} times")
        if task.status != Task.Status.ACCEPTED:
            problems.append(f"{ref} was credited but is {task.status}")
    credited = set(CreditGrant.objects.filter(reference__in=refs).values_list("reference", flat=True))
    uncredited = [pk for pk, t in tasks.items() if t.status == Task.Status.ACCEPTED and f"task:{pk}" not in credited]
    if uncredited:
        problems.append(f"accepted tasks without their credit: {uncredited}")

    # Every committed checkpoint's bytes hash to its name, at its recorded size.
    shas = {run.base_checkpoint_id, run.final_checkpoint_id,
            *(sha for r in rounds.values() for sha in (r.checkpoint_in_id, r.checkpoint_out_id))} - {None}
    for ck in Checkpoint.objects.filter(sha256__in=shas):
        path = c.blob_root / checkpoint_storage_name(ck.sha256)
        if not path.exists():
            problems.append(f"checkpoint {ck.sha256[:12]} has no file")
            continue
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != ck.sha256 or (ck.size and len(data) != ck.size):
            problems.append(f"checkpoint {ck.sha256[:12]}: file of {len(data)} bytes does not match its sha256 "
                            f"(recorded size {ck.size})")

    # Files of dead attempts: outer-optimizer blobs no round names are a leak. Temporary files (``.part``)
    # of writes killed mid-way are only noted: ``blob_sweep_temp`` removes them once they are stale.
    named = {r.outer_state_name for r in rounds.values() if r.outer_state_name} | {run.outer_state_name}
    named |= {t.update_name for t in tasks.values() if t.update_name}
    named |= {checkpoint_storage_name(sha) for sha in Checkpoint.objects.values_list("sha256", flat=True)}
    unnamed = sorted(name for name in (str(p.relative_to(c.blob_root)) for p in c.blob_root.rglob("*") if p.is_file())
                     if name not in named)
    orphans = [n for n in unnamed if n.startswith(f"outer/run-{run.pk}/") and not n.endswith(".part")]
    if orphans:
        problems.append(f"outer-state blobs of dead attempts were left behind: {orphans}")
    strays = [n for n in unnamed if n not in orphans]
    if strays:
        notes.append(f"files in checkpoint storage that no row names (temporary files of killed writes are "
                     f"swept once stale): {strays}")

    verdict = ledger_verify()
    if not verdict.ok:
        problems.append(f"ledger_verify failed: {verdict}")
    return problems, notes


def describe(outcome: Outcome) -> str:
    rows = ", ".join(f"{r['index']}:{r['status']}" for r in outcome.rounds)
    when = datetime.fromtimestamp(outcome.fault_at, UTC).strftime("%H:%M:%S")
    return (f"{outcome.drill}: run {outcome.run_status} {outcome.run_reason!r}, rounds [{rows}], fault at {when}, "
            f"recovery {outcome.recovery_s if outcome.recovery_s is None else round(outcome.recovery_s, 1)} s, "
            f"fault-free round {outcome.round_s if outcome.round_s is None else round(outcome.round_s, 1)} s")
