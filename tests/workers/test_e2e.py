"""End to end: real ``agora-worker`` processes against the live server (marketplace's enroll, heartbeat and
me endpoints, training's claim): enroll, online, paused, offline after the presence TTL, status, revoke."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

import pytest

from tests.procs import ROOT, Proc, wait_for

pytestmark = [pytest.mark.e2e]


@pytest.fixture
def fast_presence(settings):
    """Heartbeat every second, offline after three silent seconds; no rate limits in the way."""
    settings.AGORA_HEARTBEAT_INTERVAL_S = 1
    settings.AGORA_OFFLINE_AFTER_S = 3
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {
        **settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "enroll": "10000/min", "heartbeat": "10000/min"}}
    return settings


def agent_env(process_env: dict, config) -> dict:
    return {**process_env, "AGORA_WORKER_CONFIG": str(config), "AGORA_WORKER_CACHE": str(config.parent / "cache")}


def worker_cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workers.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)


def live_state(worker_id: int) -> str:
    from marketplace.models import Worker
    from marketplace.selectors import worker_live_state

    return worker_live_state(Worker.objects.get(pk=worker_id))


def test_agent_enrolls_goes_online_pauses_goes_offline_and_stops_when_revoked(process_env, live_server, member,
                                                                            fast_presence, tmp_path):
    from marketplace.models import Worker
    from marketplace.services import enrollment_token_create, worker_revoke

    config = tmp_path / "agora" / "worker.json"
    env = agent_env(process_env, config)
    secret = enrollment_token_create(owner=member, name="e2e box")

    enrolled = worker_cli(env, "enroll", "--server", live_server.url, "--token", secret.token, "--name", "e2e-box")
    assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    saved = json.loads(config.read_text())
    worker = Worker.objects.get(pk=saved["worker_id"])
    assert (worker.owner, worker.name, worker.status) == (member, "e2e-box", Worker.Status.ACTIVE)
    assert worker.benchmark_tflops > 0 and worker.benchmark_mem_gbps > 0 and worker.cpu_count >= 1
    assert live_state(worker.pk) == "offline"

    refused = worker_cli(env, "enroll", "--server", live_server.url, "--token", secret.token, "--force")
    assert refused.returncode == 1 and "already used" in refused.stderr  # the server's detail, shown as is

    agent = Proc([sys.executable, "-m", "workers.cli", "run", "--allow-cpu"], env, tmp_path / "agent.log")
    try:
        wait_for(lambda: live_state(worker.pk) == "online", 60, what="the worker online", procs=[agent])
        status = worker_cli(env, "status")
        assert status.returncode == 0, status.stderr
        assert "state:      online" in status.stdout and f"(id {worker.pk})" in status.stdout

        assert worker_cli(env, "pause").returncode == 0
        wait_for(lambda: live_state(worker.pk) == "paused", 30, what="the worker paused", procs=[agent])
        status = worker_cli(env, "status")
        assert "state:      paused" in status.stdout and "paused:     yes" in status.stdout
        assert worker_cli(env, "resume").returncode == 0
        wait_for(lambda: live_state(worker.pk) == "online", 30, what="the worker online again", procs=[agent])

        assert agent.stop() == 0, agent.output()
        wait_for(lambda: live_state(worker.pk) == "offline", 30, what="the worker offline after the TTL")
        status = worker_cli(env, "status")
        assert "state:      offline" in status.stdout

        agent = Proc([sys.executable, "-m", "workers.cli", "run", "--allow-cpu"], env, tmp_path / "agent2.log")
        wait_for(lambda: live_state(worker.pk) == "online", 60, what="the worker online after a restart",
                 procs=[agent])
        worker_revoke(worker=worker, by=member)
        wait_for(lambda: not agent.alive(), 30, what="the agent to exit after its token was revoked", procs=[agent])
        assert agent.popen.returncode == 3
        assert "no longer accepts this worker's token" in agent.output()
        assert live_state(worker.pk) == "revoked"
        status = worker_cli(env, "status")
        assert status.returncode == 3 and "agora-worker enroll" in status.stderr
    finally:
        agent.stop()


def test_a_canceled_run_stops_the_agents_task_at_once_and_nothing_is_uploaded(process_env, live_server,
                                                                              fast_presence, monkeypatch,
                                                                              tmp_path):
    """The server's ``stop_task`` reaches a real agent mid-training; the agent stops between two steps,
    uploads and reports nothing, and goes back to claiming."""
    from marketplace.services import enrollment_token_create
    from tests.factories import UserFactory
    from tests.training.factories import approved_proposal
    from training import services
    from training.models import Task

    monkeypatch.setattr("training.services.assignment._enqueue_round_check", lambda *_: None)  # no Celery in this test
    proposal = approved_proposal(diloco={"rounds": 1, "workers_per_round": 1, "min_workers": 1,
                                         "inner_steps": 100_000, "round_timeout_s": 3600})
    run = services.run_start(proposal_id=proposal.pk)
    config = tmp_path / "agora" / "worker.json"
    env = agent_env(process_env, config)
    secret = enrollment_token_create(owner=UserFactory(), name="e2e box")
    enrolled = worker_cli(env, "enroll", "--server", live_server.url, "--token", secret.token, "--name", "e2e-box")
    assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
    worker_id = json.loads(config.read_text())["worker_id"]

    agent = Proc([sys.executable, "-m", "workers.cli", "run", "--allow-cpu"], env, tmp_path / "agent.log")
    try:
        wait_for(lambda: "inner steps" in agent.output(), 120, what="the agent training", procs=[agent])
        task = Task.objects.get(round__run=run, worker_id=worker_id)
        services.run_cancel(run_id=run.pk, by=UserFactory(is_staff=True), reason="e2e: stopped mid-task")
        wait_for(lambda: f"task {task.pk} stopped" in agent.output(), 60, what="the agent stopping the task",
                 procs=[agent])
        wait_for(lambda: live_state(worker_id) == "online", 30, what="the worker idle again", procs=[agent])
        assert agent.alive()
        assert f"the server asked to stop task {task.pk}" in agent.output()
        assert "uploading" not in agent.output() and "result delivered" not in agent.output()
        task.refresh_from_db()
        assert task.update_sha256 == "" and task.status != Task.Status.FAILED
        assert not (config.parent / "state.json").exists() and not (config.parent / "result.json").exists()
        assert agent.stop() == 0, agent.output()
    finally:
        agent.stop()
