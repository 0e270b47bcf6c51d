"""A run with a sparse codec and overlap, completed by real ``agora-worker`` processes.

Real processes: the live server (pytest-django's thread), a Celery worker with beat, and two agents taking
turns on a 4-round run with one task per round (topk2 updates, error feedback, ``diloco.overlap``):

- agent A trains round 1 (``--finish``: it stops after that one task);
- agent B, which holds no checkpoint at all, trains round 2: it must download the full checkpoint;
- agent A comes back for rounds 3 and 4. For round 3 it fell behind (it holds round 1's input, the step
  published goes from round 2's), so it downloads the full checkpoint; for round 4 it holds round 3's
  input and downloads only the published step, and it trained ahead while round 3 was uploaded and
  aggregated, so round 4's update reports steps trained ahead.

The ledger records every update's hash and codec, and each accepted round's published step.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.procs import BIN, Proc, celery_worker, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SPEC = {
    "model": {"name": "e2e-sparse", "arch": "byte-gpt", "init": "scratch",
              "config": {"n_layer": 1, "n_embd": 32, "n_head": 4, "block_size": 32}},
    "dataset": {"source": "builtin:python-docs", "heldout_fraction": 0.1},
    "diloco": {"rounds": 4, "workers_per_round": 1, "min_workers": 1, "inner_steps": 16, "inner_lr": 0.003,
               "batch_size": 8, "seq_len": 32, "warmup": 2, "compression": "topk2", "aggregator": "mean",
               "outer_lr": 1.0, "outer_momentum": 0.0, "overlap": True, "round_timeout_s": 120,
               "replica_fraction": 0.0},
    "hardware": {"min_vram_mb": 0, "allow_cpu": True},
}


def _start_run(tmp_path: Path, procs):
    from django.contrib.auth import get_user_model

    from governance.models import Proposal
    from governance.specs import content_hash, spec_normalise
    from training.models import TrainingRun

    spec = spec_normalise(kind="training", spec=SPEC)
    author = get_user_model().objects.create_user("e2e-sparse-author", password=None)
    proposal = Proposal.objects.create(kind="training", status="approved", title="Sparse overlap run", author=author,
                                       spec=spec, content_hash=content_hash(spec))
    return wait_for(lambda: TrainingRun.objects.filter(proposal=proposal).first(), 120, interval=0.5,
                    what="the tick to start the run", procs=procs)


def _agent_env(env, tmp_path: Path, name: str, server: str) -> dict:
    from marketplace.services import enrollment_token_create, worker_enroll
    from tests.factories import UserFactory
    from workers import config as cfgmod

    secret = worker_enroll(
        enrollment_token=enrollment_token_create(owner=UserFactory(), name=name).token, name=name,
        hardware={"gpus": [], "cpu_count": 2, "memory_mb": 4096, "torch": "2", "cuda": None},
        benchmark={"tflops": 0.1, "mem_gbps": 5.0}, agent_version="e2e")
    path = tmp_path / name / "worker.json"
    cfgmod.save_config(cfgmod.WorkerConfig(server=server, worker_id=secret.record.pk, worker_token=secret.token,
                                           name=name, path=path))
    return {**env, "AGORA_WORKER_CONFIG": str(path), "AGORA_WORKER_CACHE": str(tmp_path / name / "cache")}


def test_a_sparse_overlapping_run_completes_and_an_agent_that_fell_behind_downloads_the_checkpoint(
        process_env, live_server, settings, tmp_path):
    from ledger.models import Entry
    from ledger.selectors import ledger_verify
    from training.models import Round, Task, TrainingRun

    settings.AGORA_HEARTBEAT_INTERVAL_S = 1
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {
        **settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "heartbeat": "10000/min", "claim_worker": "10000/min",
        "claim_address": "10000/min"}}
    env = {**process_env, "AGORA_TRAINING_TICK_S": "1", "AGORA_CLOSE_EVERY_S": "5", "AGORA_SWEEP_EVERY_S": "2",
           "AGORA_HEARTBEAT_INTERVAL_S": "1", "OMP_NUM_THREADS": "1"}
    procs: list[Proc] = []
    try:
        procs.append(celery_worker(env, tmp_path / "celery.log", beat=True))
        run = _start_run(tmp_path, procs)
        env_a = _agent_env(env, tmp_path, "agent-a", live_server.url)
        env_b = _agent_env(env, tmp_path, "agent-b", live_server.url)

        def task_of(index: int):
            return Task.objects.filter(round__run=run, round__index=index, update_sha256__gt="").first()

        def agent(name: str, agent_env: dict, *extra: str) -> Proc:
            proc = Proc([str(BIN / "agora-worker"), "run", "--allow-cpu", "--max-mbps", "100", *extra], agent_env,
                        tmp_path / f"{name}.log")
            procs.append(proc)
            return proc

        # --finish: each stint ends by itself once its one result is delivered.
        first = agent("agent-a-1", env_a, "--finish")
        wait_for(lambda: task_of(1) and not first.alive(), 120, interval=0.5, what="agent A's round 1",
                 procs=procs)
        second = agent("agent-b", env_b, "--finish")
        wait_for(lambda: task_of(2) and not second.alive(), 120, interval=0.5, what="agent B's round 2",
                 procs=procs)
        assert first.popen.returncode == 0 and second.popen.returncode == 0
        agent("agent-a-2", env_a)

        def finished():
            run.refresh_from_db()
            assert run.status not in ("failed", "canceled"), run.reason
            return run.status == TrainingRun.Status.FINISHED

        wait_for(finished, 240, interval=1, what="the run to finish its 4 rounds", procs=procs)
    finally:
        for proc in reversed(procs):
            proc.stop()

    rounds = list(Round.objects.filter(run=run).order_by("index"))
    assert [r.status for r in rounds] == ["done"] * 4, [(r.index, r.status, r.reason) for r in rounds]
    tasks = {t.round.index: t for t in Task.objects.filter(round__run=run, update_sha256__gt="")
             .select_related("round", "worker")}
    assert sorted(tasks) == [1, 2, 3, 4]
    a, b = tasks[1].worker_id, tasks[2].worker_id
    assert a != b and tasks[3].worker_id == a and tasks[4].worker_id == a
    via = {i: tasks[i].metrics.get("checkpoint_via") for i in tasks}
    assert via == {1: "full", 2: "full", 3: "full", 4: "delta"}, via  # behind in round 3: the full checkpoint
    assert tasks[4].metrics["bytes_received"] < tasks[3].metrics["bytes_received"] / 5
    assert tasks[4].metrics.get("overlap_steps", 0) >= 1 and tasks[4].metrics["overlap_from_round"] == 3
    assert "overlap_steps" not in tasks[3].metrics  # round 2 was not its: nothing trained ahead carries over
    for t in tasks.values():
        assert t.metrics["base_checkpoint_sha256"] == t.round.checkpoint_in_id
        assert 0 < t.metrics["utilisation"] <= 1

    # Every update's hash and codec are in the ledger; every accepted round names its published step.
    completed = {e.payload["task_id"]: e.payload for e in Entry.objects.filter(action="task.completed")}
    for t in tasks.values():
        assert completed[t.pk]["update_sha256"] == t.update_sha256 and completed[t.pk]["codec"] == "topk2"
    aggregated = {e.payload["round"]: e.payload for e in Entry.objects.filter(action="round.aggregated")}
    for r in rounds:
        assert aggregated[r.index]["checkpoint_sha256"] == r.checkpoint_out_id
        assert aggregated[r.index]["delta_from_sha256"] == r.checkpoint_in_id
        assert len(aggregated[r.index]["delta_sha256"]) == 64
    assert ledger_verify().ok
