"""A free-rider among real agents earns nothing and is suspended; the honest agents are credited.

Real processes: the live server, a Celery worker with beat, two ``agora-worker`` agents training on the CPU,
and a free-rider that waits for the first public step and then claims tasks with its own worker token and
uploads, validly encoded, the last public outer step θ_{r−1} − θ_r computed from the public checkpoints.
Spot re-computation is on (half the tasks), so replicas pair agents too.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from tests.procs import BIN, Proc, celery_worker, enroll_agent, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SPEC = {
    "model": {"name": "free-rider-gpt", "arch": "byte-gpt", "init": "scratch",
              "config": {"n_layer": 1, "n_embd": 32, "n_head": 4, "block_size": 32}},
    "dataset": {"source": "builtin:python-docs", "heldout_fraction": 0.1},
    "diloco": {"rounds": 5, "workers_per_round": 2, "min_workers": 1, "inner_steps": 10, "inner_lr": 0.003,
               "batch_size": 8, "seq_len": 32, "warmup": 2, "compression": "int8", "aggregator": "mean",
               "round_timeout_s": 60, "replica_fraction": 0.5},
    "hardware": {"min_vram_mb": 0, "allow_cpu": True},
}

FREE_RIDER = r'''
import json, os, sys, time
import httpx
from safetensors.torch import load as load_safetensors
from diloco.codecs import encode_update

server, token, stop_file = sys.argv[1], sys.argv[2], sys.argv[3]
headers = {"Authorization": f"Bearer {token}"}
uploads = 0


def weights(client, sha):
    r = client.get(f"/api/v1/checkpoints/{sha}")
    r.raise_for_status()
    return load_safetensors(r.content)


def accepted_rounds(client, run_id):
    rounds = client.get(f"/api/v1/runs/{run_id}/").json()["rounds"]
    return [r for r in rounds if r["checkpoint_out"] and r["checkpoint_out"] != r["checkpoint_in"]]


def something_to_copy(client):
    """Free-riding needs a public step: wait until some running run has one before taking any work."""
    runs = client.get("/api/v1/runs/").json()
    runs = runs.get("results", runs) if isinstance(runs, dict) else runs
    return any(accepted_rounds(client, run["id"]) for run in runs if run["status"] == "running")


with httpx.Client(base_url=server, headers=headers, timeout=60) as client:
    while not os.path.exists(stop_file):
        if not something_to_copy(client):
            time.sleep(0.3)
            continue
        r = client.post("/api/v1/tasks/claim")
        if r.status_code != 200:
            if r.status_code == 403:
                print(f"claim refused: {r.text}", flush=True)
                time.sleep(1.0)
            time.sleep(0.3)
            continue
        task = r.json()
        last = accepted_rounds(client, task["run_id"])[-1]
        before, after = weights(client, last["checkpoint_in"]), weights(client, last["checkpoint_out"])
        data = encode_update({k: before[k].float() - after[k].float() for k in after}, task["compression"])
        metrics = {"loss_start": 5.5, "loss_end": 2.0, "steps": task["inner"]["steps"],
                   "tokens": task["inner"]["steps"] * task["inner"]["batch_size"] * task["inner"]["seq_len"],
                   "seconds": 1.0}
        r = client.post(f"/api/v1/tasks/{task['id']}/result", files={"update": ("u.safetensors", data)},
                        data={"metrics": json.dumps(metrics)})
        uploads += 1
        print(f"the public step of round {last['index']} uploaded for task {task['id']} (round {task['round']}): "
              f"HTTP {r.status_code}", flush=True)
print(f"free-rider done after {uploads} uploads", flush=True)
'''


def _approved_proposal(settings):
    from governance.services import proposal_approve, proposal_close, proposal_submit, vote_cast
    from tests.factories import UserFactory

    settings.AGORA_VOTING_PERIOD = timedelta(seconds=3)
    settings.AGORA_QUORUM = 3
    author, staff = UserFactory(), UserFactory(is_staff=True)
    proposal = proposal_submit(author=author, kind="training", title="Train free-rider-gpt on the Python docs",
                               body="Five rounds with a free-rider in the pool.", spec=SPEC, open_now=True)
    for voter in (author, UserFactory(), UserFactory()):
        vote_cast(proposal=proposal, voter=voter, choice="yes")
    proposal.refresh_from_db()
    time.sleep(max(0.0, (proposal.closes_at - timezone.now()).total_seconds()) + 0.2)
    proposal = proposal_close(proposal_id=proposal.pk)  # the beat may have closed it already
    assert proposal.status == "succeeded", proposal.status
    return proposal_approve(proposal=proposal, by=staff)


def _story(run) -> str:
    """Every round and task of the run, for a failing assertion to show what happened."""
    lines = []
    for r in run.rounds.order_by("index"):
        lines.append(f"round {r.index}: {r.status} {r.reason}")
        for t in r.tasks.order_by("id"):
            lines.append(f"  task {t.pk} shard {t.shard_index} replica_of {t.replica_of_id} worker "
                         f"{t.worker.name if t.worker_id else None}: {t.status} {t.reason} {t.replica_check or ''}")
    return "\n".join(lines)


def test_a_free_rider_earns_nothing_and_is_suspended_while_honest_agents_are_credited(process_env, live_server,
                                                                                        settings, tmp_path: Path):
    from ledger.models import Entry
    from ledger.selectors import ledger_verify
    from marketplace.models import CreditGrant, Worker
    from marketplace.services import enrollment_token_create, worker_enroll
    from tests.factories import UserFactory
    from training.models import Task, TrainingRun

    settings.AGORA_HEARTBEAT_INTERVAL_S = 1
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {
        **settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "heartbeat": "10000/min", "enroll": "1000/min",
        "claim_worker": "10000/min", "claim_address": "10000/min"}}
    # Reliability starts at 0.5 and falls by a tenth per blamed result: three blamed uploads take it under 0.4.
    env = {**process_env, "AGORA_TRAINING_TICK_S": "1", "AGORA_CLOSE_EVERY_S": "2", "AGORA_SWEEP_EVERY_S": "5",
           "AGORA_HEARTBEAT_INTERVAL_S": "1", "AGORA_SUSPEND_BELOW_RELIABILITY": "0.4",
           "AGORA_SUSPEND_AFTER_TASKS": "3", "AGORA_SCORE_WINDOWS": "8"}
    procs: list[Proc] = []
    stop_file = tmp_path / "stop"
    try:
        procs.append(celery_worker(env, tmp_path / "celery.log", beat=True))
        proposal = _approved_proposal(settings)
        run = wait_for(lambda: TrainingRun.objects.filter(proposal=proposal).first(), 120,
                       what="the run to be created from the approved proposal", procs=procs)
        rider = worker_enroll(
            enrollment_token=enrollment_token_create(owner=UserFactory(), name="free-rider").token, name="free-rider",
            hardware={"gpus": [], "cpu_count": 2, "memory_mb": 2048, "torch": "2.13.0", "cuda": None},
            benchmark={"tflops": 0.1, "mem_gbps": 1.0}, agent_version="free-rider")
        script = tmp_path / "free_rider.py"
        script.write_text(FREE_RIDER)
        procs.append(Proc([sys.executable, str(script), live_server.url, rider.token, str(stop_file)], env,
                          tmp_path / "free-rider.log"))
        honest = []
        for name in ("honest-1", "honest-2"):
            agent_env, config = enroll_agent(env, tmp_path, name, live_server.url)
            honest.append(name)
            procs.append(Proc([str(BIN / "agora-worker"), "run", "--allow-cpu"], agent_env, tmp_path / f"{name}.log"))

        def finished():
            run.refresh_from_db()
            assert run.status not in ("failed", "canceled"), run.reason
            return run.status == TrainingRun.Status.FINISHED

        wait_for(finished, 600, interval=1, what="the run to finish its 5 rounds", procs=procs)

        rider_id = rider.record.pk
        story = _story(run)
        print(story)
        uploads = Task.objects.filter(round__run=run, worker_id=rider_id).exclude(update_sha256="")
        assert uploads.count() >= 3, story
        assert set(uploads.values_list("status", flat=True)) == {Task.Status.REJECTED}, story
        assert not CreditGrant.objects.filter(worker_id=rider_id).exists()
        worker = Worker.objects.get(pk=rider_id)
        assert worker.status == Worker.Status.SUSPENDED, (worker.reliability, worker.tasks_invalid, story)
        suspended = [e.payload for e in Entry.objects.filter(action="worker.suspended")
                     if e.payload["worker_id"] == rider_id]
        assert len(suspended) == 1 and suspended[0]["automatic"] is True, suspended
        assert "reliability" in suspended[0]["reason"], suspended
        codes = {r["code"] for e in Entry.objects.filter(action__in=["round.aggregated", "round.rejected"])
                 for r in e.payload["rejected"] if r["worker_id"] == rider_id}
        assert "replay" in codes, story  # caught as a copy of a public step, whatever else the round saw
        assert codes <= {"replay", "score", "replica_mismatch", "direction", "norm_low", "norm_high"}, story

        for name in honest:
            w = Worker.objects.get(name=name)
            assert CreditGrant.objects.filter(worker=w).exists(), f"{name} was never credited: {story}"
            assert w.status == Worker.Status.ACTIVE, story
        assert ledger_verify().ok
    finally:
        stop_file.write_text("stop")
        for proc in reversed(procs):
            proc.stop()
