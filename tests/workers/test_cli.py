"""``agora-worker`` as a real process against the fake protocol server: enroll, run, signals, status."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workers import config as cfgmod

ROOT = Path(__file__).resolve().parents[2]


def cli_env(config_path: Path) -> dict:
    env = dict(os.environ)
    env.update(AGORA_WORKER_CONFIG=str(config_path), PYTHONUNBUFFERED="1")
    env.pop("AGORA_WORKER_CACHE", None)
    return env


def cli(config_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workers.cli", *args], cwd=ROOT, env=cli_env(config_path),
                          capture_output=True, text=True, timeout=timeout)


class AgentProcess:
    def __init__(self, config_path: Path, *args: str):
        self.log_path = config_path.parent / "agent.log"
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen([sys.executable, "-m", "workers.cli", "run", *args], cwd=ROOT,
                                      env=cli_env(config_path), stdout=self._log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_output(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in the agent's output:\n{self.output()}")

    def signal(self, sig) -> None:
        self.popen.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.popen.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)
        self._log.close()


@pytest.fixture
def agent_procs():
    procs: list[AgentProcess] = []
    yield procs
    for p in procs:
        p.kill()


@pytest.fixture
def config_path(tmp_path) -> Path:
    return tmp_path / "conf" / "worker.json"


# --- enroll ---------------------------------------------------------------------------------------


def test_enroll_detects_hardware_benchmarks_and_saves_a_private_config(fake_server, config_path):
    result = cli(config_path, "enroll", "--server", fake_server.url + "/", "--token", "enr_abc", "--name", "box-1")
    assert result.returncode == 0, result.stderr
    assert "enrolled as worker 7 (box-1)" in result.stdout
    body = fake_server.calls("POST", "/api/v1/workers/enroll")[0].json
    assert body["enrollment_token"] == "enr_abc" and body["name"] == "box-1"
    assert set(body["hardware"]) == {"gpus", "cpu_count", "memory_mb", "torch", "cuda"}
    assert body["benchmark"]["tflops"] > 0 and body["benchmark"]["mem_gbps"] > 0
    assert body["agent_version"]
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o600
    saved = json.loads(config_path.read_text())
    assert saved["server"] == fake_server.url and saved["worker_id"] == 7 and saved["worker_token"] == "wkr_secret"
    assert "wkr_secret" not in result.stdout + result.stderr

    again = cli(config_path, "enroll", "--server", fake_server.url, "--token", "enr_def")
    assert again.returncode == 1 and "already enrolled as worker 7" in again.stderr and "--force" in again.stderr


def test_enroll_shows_the_servers_reason_when_the_token_is_refused(fake_server, config_path):
    fake_server.on("POST", "/api/v1/workers/enroll",
                   (403, {"error": "enrollment_token_used", "detail": "This enrollment token was already used."}))
    result = cli(config_path, "enroll", "--server", fake_server.url, "--token", "enr_abc")
    assert result.returncode == 1
    assert "the server refused the enrollment: This enrollment token was already used." in result.stderr
    assert not config_path.exists()


def test_enroll_says_when_the_server_is_unreachable(config_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = cli(config_path, "enroll", "--server", f"http://127.0.0.1:{port}", "--token", "enr_abc")
    assert result.returncode == 1 and f"cannot reach the server at http://127.0.0.1:{port}" in result.stderr
    bad = cli(config_path, "enroll", "--server", "agora.example.org", "--token", "enr_abc")
    assert bad.returncode == 1 and "must be an http(s) URL" in bad.stderr


# --- run, status, pause ---------------------------------------------------------------------------


def test_run_without_config_or_gpu_refuses_clearly(fake_server, config_path, worker_config):
    missing = cli(config_path, "run", "--allow-cpu")
    assert missing.returncode == 1 and "agora-worker enroll" in missing.stderr
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = cli(worker_config.path, "run")
    assert result.returncode == 1 and "no CUDA GPU found" in result.stderr and "--allow-cpu" in result.stderr
    result = cli(worker_config.path, "run", "--gpus", "0")
    assert result.returncode == 1 and "--gpus asks for GPU 0" in result.stderr
    assert fake_server.requests == []


def test_status_prints_the_live_record(fake_server, worker_config):
    cfgmod.set_paused(worker_config.path, True)
    with cfgmod.AgentLock(worker_config.path):  # as a running agent holds it
        result = cli(worker_config.path, "status")
    assert result.returncode == 0, result.stderr
    for text in ("box (id 7)", fake_server.url, f"agent:      running (pid {os.getpid()})", "paused:     yes",
                 "state:      online", "reliability: 0.500", "credits:    3.0000"):
        assert text in result.stdout
    fake_server.on("GET", "/api/v1/workers/me", (401, {"error": "invalid_token", "detail": "revoked"}))
    result = cli(worker_config.path, "status")
    assert result.returncode == 3 and "no longer accepts this worker's token" in result.stderr


def test_pause_and_resume_commands(worker_config):
    assert "paused" in cli(worker_config.path, "pause").stdout
    assert cfgmod.is_paused(worker_config.path)
    assert cli(worker_config.path, "pause").stdout.strip() == "already paused"
    assert cli(worker_config.path, "resume").stdout.strip() == "resumed"
    assert not cfgmod.is_paused(worker_config.path)


def test_run_trains_a_real_task_and_uploads_it(fake_server, serve_task, worker_config, tiny_checkpoint, agent_procs):
    from diloco.codecs import decode_update, reference_of

    task = serve_task()
    agent = AgentProcess(worker_config.path, "--allow-cpu", "--finish")
    agent_procs.append(agent)
    assert agent.wait(120) == 0, agent.output()
    rec = fake_server.calls("POST", f"/api/v1/tasks/{task['id']}/result")[0]
    delta = decode_update(rec.form["update"], reference_of(tiny_checkpoint[2]))
    assert set(delta) == set(tiny_checkpoint[2])
    assert json.loads(rec.form["metrics"])["steps"] == task["inner"]["steps"]
    busy = [h for h in fake_server.heartbeats() if h["state"] == "busy"]
    assert busy and busy[0]["task_id"] == task["id"]
    assert (worker_config.directory / "cache" / "checkpoints" / f"{task['checkpoint_sha256']}.safetensors").exists()
    assert "result delivered" in agent.output()


def test_sigusr1_toggles_pause_and_sigterm_stops_an_idle_agent(fake_server, worker_config, agent_procs):
    agent = AgentProcess(worker_config.path, "--allow-cpu")
    agent_procs.append(agent)
    fake_server.wait_for(lambda: fake_server.claims(), what="a claim")
    agent.signal(signal.SIGUSR1)
    fake_server.wait_for(lambda: fake_server.heartbeats()[-1]["state"] == "paused", what="paused heartbeat")
    assert cfgmod.is_paused(worker_config.path)
    claims = len(fake_server.claims())
    agent.signal(signal.SIGUSR1)
    fake_server.wait_for(lambda: fake_server.heartbeats()[-1]["state"] == "idle", what="idle heartbeat")
    assert not cfgmod.is_paused(worker_config.path)
    fake_server.wait_for(lambda: len(fake_server.claims()) > claims, what="claims again")
    agent.signal(signal.SIGTERM)
    assert agent.wait(30) == 0, agent.output()


def test_sigterm_while_busy_finishes_the_task_then_exits(fake_server, serve_task, worker_config, agent_procs):
    task = serve_task(steps=200)
    agent = AgentProcess(worker_config.path, "--allow-cpu")
    agent_procs.append(agent)
    agent.wait_output("claimed task 17")  # still to come: download, data, 200 steps
    agent.signal(signal.SIGTERM)
    assert agent.wait(300) == 0, agent.output()
    assert "stopping after task 17 is finished" in agent.output()
    assert len(fake_server.calls("POST", f"/api/v1/tasks/{task['id']}/result")) == 1
    assert fake_server.calls("POST", f"/api/v1/tasks/{task['id']}/fail") == []
    assert len(fake_server.claims()) == 1


def test_second_sigint_aborts_the_task_and_reports_fail(fake_server, serve_task, worker_config, agent_procs):
    task = serve_task(steps=1_000_000)
    agent = AgentProcess(worker_config.path, "--allow-cpu")
    agent_procs.append(agent)
    agent.wait_output("task 17: 1000000 inner steps")
    agent.signal(signal.SIGINT)
    agent.wait_output("interrupt again to abort it")
    agent.signal(signal.SIGINT)
    assert agent.wait(60) == 0, agent.output()
    fails = fake_server.calls("POST", f"/api/v1/tasks/{task['id']}/fail")
    assert [f.json for f in fails] == [{"reason": "aborted by the volunteer"}]
    assert fake_server.calls("POST", f"/api/v1/tasks/{task['id']}/result") == []
    assert cfgmod.state_load(worker_config.path) == {}


def test_restarted_agent_reports_the_interrupted_task(fake_server, serve_task, worker_config, agent_procs):
    task = serve_task(steps=1_000_000)
    agent = AgentProcess(worker_config.path, "--allow-cpu")
    agent_procs.append(agent)
    agent.wait_output("task 17: 1000000 inner steps")
    agent.kill()  # a crash or power cut: nothing reported
    assert cfgmod.state_load(worker_config.path)["task_id"] == task["id"]
    assert fake_server.calls("POST", f"/api/v1/tasks/{task['id']}/fail") == []
    again = AgentProcess(worker_config.path, "--allow-cpu", "--once")
    agent_procs.append(again)
    assert again.wait(60) == 0, again.output()
    fails = fake_server.calls("POST", f"/api/v1/tasks/{task['id']}/fail")
    assert [f.json for f in fails] == [{"reason": "agent restarted"}]
    assert cfgmod.state_load(worker_config.path) == {}



def test_one_agent_per_config_and_status_never_shows_a_dead_agent_busy(fake_server, serve_task, worker_config,
                                                                       agent_procs):
    serve_task(steps=1_000_000)
    fake_server.on("GET", "/api/v1/workers/me", {"id": 7, "name": "box", "live_state": "busy", "task_id": 17,
                                                 "progress": 0.1, "status": "active", "reliability": 0.5,
                                                 "credits": "0", "tasks_valid": 0, "tasks_invalid": 0})
    agent = AgentProcess(worker_config.path, "--allow-cpu")
    agent_procs.append(agent)
    agent.wait_output("task 17: 1000000 inner steps")

    second = cli(worker_config.path, "run", "--allow-cpu", timeout=60)
    assert second.returncode == 4, second.stderr
    assert f"another agent (pid {agent.popen.pid}) is already running" in second.stderr
    enroll = cli(worker_config.path, "enroll", "--server", fake_server.url, "--token", "enr_x", "--force")
    assert enroll.returncode == 4 and "stop it before enrolling again" in enroll.stderr
    status = cli(worker_config.path, "status")
    assert status.returncode == 0, status.stderr
    assert f"agent:      running (pid {agent.popen.pid})" in status.stdout
    assert "local task: 17 (started" in status.stdout and "state:      busy (task 17, 10%)" in status.stdout

    agent.kill()  # kill -9: the server still shows it busy until its presence times out
    status = cli(worker_config.path, "status")
    assert status.returncode == 0, status.stderr
    assert "agent:      not running" in status.stdout
    assert "local task: 17 was interrupted" in status.stdout
    assert "state:      not running here" in status.stdout and "state:      busy" not in status.stdout
    assert fake_server.calls("POST", "/api/v1/tasks/17/fail") == []


def test_a_result_waiting_when_the_agent_is_killed_is_delivered_when_it_starts_again(fake_server, serve_task,
                                                                                   worker_config, agent_procs):
    task = serve_task(steps=3)
    fake_server.on("POST", "/api/v1/tasks/17/result", (503, {"error": "unavailable", "detail": "restarting"}))
    agent = AgentProcess(worker_config.path, "--allow-cpu")
    agent_procs.append(agent)
    agent.wait_output("delivering the result failed")
    agent.kill()  # kill -9 (or a power cut) while the upload is being retried
    kept = cfgmod.pending_load(worker_config.path)
    assert kept.task_id == task["id"] and kept.metrics["steps"] == 3
    status = cli(worker_config.path, "status")
    assert "result:     task 17 (run 4, round 1)" in status.stdout and "delivered when the agent starts" in \
        status.stdout

    fake_server.on("POST", "/api/v1/tasks/17/result", (202, {"accepted_for_aggregation": True}))
    again = AgentProcess(worker_config.path, "--allow-cpu", "--once")
    agent_procs.append(again)
    assert again.wait(60) == 0, again.output()
    assert "delivering the result of task 17" in again.output() and "result delivered" in again.output()
    delivered = fake_server.calls("POST", "/api/v1/tasks/17/result")[-1]
    assert delivered.form["update"] == kept.update
    assert json.loads(delivered.form["metrics"]) == kept.metrics
    assert fake_server.calls("POST", "/api/v1/tasks/17/fail") == []
    assert cfgmod.pending_manifest(worker_config.path) is None


LIBFAKETIME = next((p for p in ("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
                                "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
                                "/usr/lib/faketime/libfaketimeMT.so.1") if os.path.exists(p)), None)


@pytest.mark.skipif(LIBFAKETIME is None, reason="libfaketime is not installed")
def test_an_agent_whose_clock_is_an_hour_behind_stops_at_the_servers_deadline(fake_server, serve_task,
                                                                             worker_config, agent_procs, monkeypatch):
    from datetime import UTC, datetime

    task = serve_task(steps=1_000_000)

    def claim(_req):  # the deadline comes 3 s after the claim, on the server's clock
        if fake_server.claims()[1:]:
            return 204, None
        deadline = datetime.fromtimestamp(fake_server.now() + 3, UTC).isoformat(timespec="milliseconds")
        return 200, {**task, "deadline": deadline}

    fake_server.on("POST", "/api/v1/tasks/claim", claim)
    monkeypatch.setenv("LD_PRELOAD", LIBFAKETIME)
    monkeypatch.setenv("FAKETIME", "-3600")  # every clock of the process, monotonic ones included
    monkeypatch.setenv("FAKETIME_DONT_RESET", "1")
    agent = AgentProcess(worker_config.path, "--allow-cpu")
    agent_procs.append(agent)
    agent.wait_output("task 17 stopped: its deadline")
    fake_server.wait_for(lambda: len(fake_server.claims()) >= 2, what="claiming again")
    agent.signal(signal.SIGTERM)
    assert agent.wait(60) == 0, agent.output()
    assert fake_server.calls("POST", "/api/v1/tasks/17/result") == []
    assert fake_server.calls("POST", "/api/v1/tasks/17/fail") == []
