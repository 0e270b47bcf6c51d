"""The agent's loop against a fake protocol server, with a fake runner (training is tested in test_runner)."""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from tests.workers.conftest import future, make_task
from tests.workers.fakeserver import DROP
from workers import config as cfgmod
from workers.agent import EXIT_AUTH, Agent, AgentOptions
from workers.client import Backoff
from workers.runner import TaskError, TaskOutput

METRICS = {"loss_start": 5.5, "loss_end": 5.0, "steps": 4, "tokens": 128, "seconds": 0.1}


class FakeRunner:
    """Calls the hooks like the real runner. With ``gate``, it holds after step 1 (still checking the hooks)
    until the gate opens; ``error`` is raised after the last step."""

    def __init__(self, steps: int = 4, gate: threading.Event | None = None, error: Exception | None = None,
                 step_s: float = 0.0):
        self.steps = steps
        self.step_s = step_s
        self.gate = gate
        self.error = error
        self.tasks: list[dict] = []
        self.steps_done = 0

    def run(self, task, hooks):
        self.tasks.append(task)
        for step in range(1, self.steps + 1):
            hooks.on_step(step, self.steps, 5.0)
            self.steps_done += 1
            time.sleep(self.step_s)
            while self.gate is not None and step == 1 and not self.gate.is_set():
                hooks.check()
                time.sleep(0.005)
        if self.error is not None:
            raise self.error
        return TaskOutput(update=b"UPDATE", metrics=dict(METRICS), details={})


class RecordingBackoff(Backoff):
    def __init__(self):
        super().__init__(base=0.01, cap=0.04, rng=random.Random(0))
        self.delays: list[tuple[float, float]] = []  # (ceiling, delay)

    def next_delay(self) -> float:
        ceiling = self.ceiling()
        delay = super().next_delay()
        self.delays.append((ceiling, delay))
        return delay


class Running:
    def __init__(self, agent: Agent):
        self.agent = agent
        self.code = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        self.code = self.agent.run()

    def join(self, timeout: float = 20.0) -> int:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the agent did not stop"
        return self.code

    def stop(self) -> int:
        self.agent.request_stop()
        return self.join()


@pytest.fixture
def start(worker_config):
    running: list[Running] = []

    def start(runner=None, idle_check=None, backoff=None, **options) -> Running:
        opts = AgentOptions(min_poll_s=0.02, backoff_base_s=0.01, backoff_cap_s=0.04, pause_check_s=0.01,
                            **options)
        agent = Agent(worker_config, runner=runner or FakeRunner(), options=opts, idle_check=idle_check,
                      backoff=backoff)
        running.append(Running(agent))
        return running[-1]

    yield start
    for r in running:
        r.agent.request_abort()
        r.thread.join(10)


def serve_tasks(fake_server, *tasks, forever=False):
    queue = list(tasks)

    def claim(_req):
        if queue:
            return 200, (queue[0] if forever else queue.pop(0))
        return 204, None

    fake_server.on("POST", "/api/v1/tasks/claim", claim)
    for t in tasks:
        fake_server.on("POST", f"/api/v1/tasks/{t['id']}/result", (202, {"accepted_for_aggregation": True}))
        fake_server.on("POST", f"/api/v1/tasks/{t['id']}/fail", (200, {}))


def test_idle_agent_heartbeats_then_claims_and_polls_again_after_204(fake_server, start):
    agent = start()
    fake_server.wait_for(lambda: len(fake_server.claims()) >= 3, what="three claims")
    assert agent.stop() == 0
    first = fake_server.requests[0]
    assert first.path == "/api/v1/workers/heartbeat"
    assert first.headers["Authorization"] == "Bearer wkr_secret"
    assert all(hb == {"state": "idle", "task_id": None, "progress": None} for hb in fake_server.heartbeats())
    # every claim is preceded by an idle heartbeat
    paths = [r.path for r in fake_server.requests]
    for i, p in enumerate(paths):
        if p.endswith("/claim"):
            assert paths[i - 1].endswith("/heartbeat")


def test_once_exits_after_a_claim_without_work(fake_server, start):
    agent = start(once=True)
    assert agent.join() == 0
    assert len(fake_server.claims()) == 1


def test_task_runs_with_busy_heartbeats_and_uploads_the_result(fake_server, start, worker_config):
    gate = threading.Event()
    runner = FakeRunner(gate=gate)
    serve_tasks(fake_server, make_task(17))
    agent = start(runner=runner)
    fake_server.wait_for(lambda: {"state": "busy", "task_id": 17, "progress": 0.25} in fake_server.heartbeats(),
                         what="busy heartbeat")
    assert cfgmod.state_load(worker_config.path)["task_id"] == 17  # kept on disk while the task runs
    assert len(fake_server.claims()) == 1  # no claims while busy
    gate.set()
    rec = fake_server.wait_for(lambda: fake_server.calls("POST", "/api/v1/tasks/17/result"), what="result")[0]
    assert rec.form["update"] == b"UPDATE"
    import json

    sent = json.loads(rec.form["metrics"])
    assert {k: sent[k] for k in METRICS} == METRICS
    # The round's utilisation and traffic: the claim's answer came in, the update goes out.
    assert 0 < sent["compute_seconds"] <= sent["wall_seconds"]
    assert sent["utilisation"] == round(sent["compute_seconds"] / sent["wall_seconds"], 4)
    assert sent["bytes_sent"] >= len(b"UPDATE") and sent["bytes_received"] > 0
    fake_server.wait_for(lambda: len(fake_server.claims()) >= 2, what="claiming again")
    assert cfgmod.state_load(worker_config.path) == {}
    assert agent.stop() == 0
    assert agent.agent.tasks_done == 1
    assert fake_server.heartbeats()[-1]["state"] == "idle"
    assert not fake_server.calls("POST", "/api/v1/tasks/17/fail")


def test_after_a_result_the_agent_asks_again_soon_then_less_and_less_often(fake_server, start):
    """The next round opens seconds after the last result: with a 30 s polling interval the agent re-claims
    after 0.25 s, 0.5 s, 1 s, ... instead of waiting the whole interval, and does not heartbeat more than
    once a second while doing so."""
    fake_server.on("POST", "/api/v1/workers/heartbeat", {"poll_after_s": 30, "worker_state": "online"})
    serve_tasks(fake_server, make_task(17))
    claimed_at: list[float] = []
    claim = fake_server.routes[("POST", "/api/v1/tasks/claim")]

    def timed_claim(req):
        claimed_at.append(time.monotonic())
        return claim(req)

    fake_server.on("POST", "/api/v1/tasks/claim", timed_claim)
    agent = start()
    fake_server.wait_for(lambda: fake_server.calls("POST", "/api/v1/tasks/17/result"), what="result")
    fake_server.wait_for(lambda: len(claimed_at) >= 5, timeout=20, what="quick re-claims")
    assert agent.stop() == 0
    gaps = [b - a for a, b in zip(claimed_at[1:-1], claimed_at[2:], strict=True)]  # the re-claims after the result
    assert all(later > earlier for earlier, later in zip(gaps[:-1], gaps[1:], strict=True))  # backing off, ...
    assert gaps[-1] < 30  # ... not the 30 s interval
    heartbeats = [r for r in fake_server.requests if r.path == "/api/v1/workers/heartbeat"]
    assert len(heartbeats) < len(fake_server.claims())  # re-claims in the first second skip the heartbeat


def test_pause_file_means_paused_heartbeats_and_no_claims(fake_server, start, worker_config):
    cfgmod.set_paused(worker_config.path, True)
    agent = start()
    fake_server.wait_for(lambda: len(fake_server.heartbeats()) >= 5, what="heartbeats")
    assert all(hb == {"state": "paused", "task_id": None, "progress": None} for hb in fake_server.heartbeats())
    assert fake_server.claims() == []
    cfgmod.set_paused(worker_config.path, False)
    fake_server.wait_for(lambda: fake_server.claims(), what="a claim after resuming")
    assert fake_server.heartbeats()[-1]["state"] == "idle"
    assert agent.stop() == 0


def test_pause_during_a_task_halts_training_until_resumed(fake_server, start, worker_config):
    runner = FakeRunner(steps=1000, step_s=0.005)
    serve_tasks(fake_server, make_task(17))
    agent = start(runner=runner)
    fake_server.wait_for(lambda: any(hb["state"] == "busy" for hb in fake_server.heartbeats()), what="busy")
    cfgmod.set_paused(worker_config.path, True)
    hb = fake_server.wait_for(
        lambda: [h for h in fake_server.heartbeats() if h["state"] == "paused" and h["task_id"] == 17],
        what="paused heartbeat with the task")[0]
    assert 0 < hb["progress"] < 1
    steps = runner.steps_done
    n = len(fake_server.heartbeats())
    fake_server.wait_for(lambda: len(fake_server.heartbeats()) >= n + 3, what="more heartbeats while paused")
    assert runner.steps_done == steps  # no training while paused
    assert fake_server.claims()[1:] == []
    cfgmod.set_paused(worker_config.path, False)
    fake_server.wait_for(lambda: fake_server.calls("POST", "/api/v1/tasks/17/result"), what="result after resume")
    assert runner.steps_done == 1000
    assert agent.stop() == 0


def test_finish_option_stops_after_one_task(fake_server, start):
    serve_tasks(fake_server, make_task(17), forever=True)
    agent = start(finish=True)
    assert agent.join() == 0
    assert len(fake_server.claims()) == 1
    assert len(fake_server.calls("POST", "/api/v1/tasks/17/result")) == 1


def test_first_stop_finishes_the_task_then_stops(fake_server, start):
    gate = threading.Event()
    serve_tasks(fake_server, make_task(17), make_task(18))
    agent = start(runner=FakeRunner(gate=gate))
    fake_server.wait_for(lambda: any(hb["state"] == "busy" for hb in fake_server.heartbeats()), what="busy")
    agent.agent.request_stop()
    time.sleep(0.05)
    assert agent.thread.is_alive()  # still finishing
    gate.set()
    assert agent.join() == 0
    assert len(fake_server.calls("POST", "/api/v1/tasks/17/result")) == 1
    assert len(fake_server.claims()) == 1
    assert fake_server.calls("POST", "/api/v1/tasks/17/fail") == []


def test_second_stop_aborts_the_task_and_reports_fail(fake_server, start, worker_config):
    serve_tasks(fake_server, make_task(17))
    agent = start(runner=FakeRunner(gate=threading.Event()))  # never finishes on its own
    fake_server.wait_for(lambda: any(hb["state"] == "busy" for hb in fake_server.heartbeats()), what="busy")
    agent.agent.request_stop()
    agent.agent.request_stop()
    assert agent.join() == 0
    fail = fake_server.calls("POST", "/api/v1/tasks/17/fail")
    assert [f.json for f in fail] == [{"reason": "aborted by the volunteer"}]
    assert fake_server.calls("POST", "/api/v1/tasks/17/result") == []
    assert cfgmod.state_load(worker_config.path) == {}


def test_a_failing_task_is_reported_and_the_agent_goes_on(fake_server, start):
    serve_tasks(fake_server, make_task(17))
    agent = start(runner=FakeRunner(error=TaskError("the data shard has 3 bytes")))
    fail = fake_server.wait_for(lambda: fake_server.calls("POST", "/api/v1/tasks/17/fail"), what="fail")
    assert fail[0].json == {"reason": "TaskError: the data shard has 3 bytes"}
    fake_server.wait_for(lambda: len(fake_server.claims()) >= 2, what="claiming again")
    assert agent.stop() == 0


def test_401_stops_the_agent_with_a_clear_message(fake_server, start):
    fake_server.on("POST", "/api/v1/workers/heartbeat",
                   (401, {"error": "invalid_token", "detail": "The worker token is unknown or was revoked."}))
    agent = start()
    assert agent.join() == EXIT_AUTH
    assert "revoked" in agent.agent.stop_message and "agora-worker enroll" in agent.agent.stop_message
    assert len(fake_server.heartbeats()) == 1  # no retries against a refused token
    assert fake_server.claims() == []


def test_403_suspended_stops_the_agent(fake_server, start):
    fake_server.on("POST", "/api/v1/tasks/claim", (403, {"error": "worker_suspended", "detail": "bad updates"}))
    agent = start()
    assert agent.join() == EXIT_AUTH
    assert "suspended" in agent.agent.stop_message and "bad updates" in agent.agent.stop_message


def test_token_revoked_during_a_task_aborts_it_and_stops(fake_server, start):
    serve_tasks(fake_server, make_task(17))
    runner = FakeRunner(gate=threading.Event())
    agent = start(runner=runner)
    fake_server.wait_for(lambda: any(hb["state"] == "busy" for hb in fake_server.heartbeats()), what="busy")
    fake_server.on("POST", "/api/v1/workers/heartbeat", (401, {"error": "invalid_token", "detail": "revoked"}))
    assert agent.join() == EXIT_AUTH
    assert fake_server.calls("POST", "/api/v1/tasks/17/fail") == []  # the token would be refused anyway


def test_network_errors_and_5xx_are_retried_with_capped_jittered_backoff(fake_server, start):
    dropped = []

    def flaky_heartbeat(_req):
        if len(dropped) < 4:
            dropped.append(1)
            return DROP
        return {"poll_after_s": 0, "worker_state": "online"}

    failures = []

    def flaky_claim(_req):
        if len(failures) < 2:
            failures.append(1)
            return 503, {"error": "unavailable", "detail": "maintenance"}
        return 204, None

    fake_server.on("POST", "/api/v1/workers/heartbeat", flaky_heartbeat)
    fake_server.on("POST", "/api/v1/tasks/claim", flaky_claim)
    backoff = RecordingBackoff()
    agent = start(backoff=backoff)
    fake_server.wait_for(lambda: len(fake_server.claims()) >= 4, what="claims after recovery")
    assert agent.stop() == 0
    # four dropped heartbeats in a row: the ceiling doubles each time up to the cap; every delay within it
    assert [c for c, _ in backoff.delays[:4]] == [0.01, 0.02, 0.04, 0.04]
    assert all(0 <= d <= c for c, d in backoff.delays)
    # a success resets the backoff: the 503s start again from the base
    assert [c for c, _ in backoff.delays[4:6]] == [0.01, 0.01]
    assert len(backoff.delays) == 6


def test_throttled_heartbeat_waits_at_least_retry_after(fake_server, start, monkeypatch):
    waits = []
    real_wait = Agent._wait
    monkeypatch.setattr(Agent, "_wait", lambda self, s: (waits.append(s), real_wait(self, s)))
    answers = [(429, {"error": "throttled", "detail": "slow down"}, {"Retry-After": "1"})]
    fake_server.on("POST", "/api/v1/workers/heartbeat",
                   lambda _r: answers.pop() if answers else {"poll_after_s": 0, "worker_state": "online"})
    agent = start()
    fake_server.wait_for(lambda: fake_server.claims(), what="a claim")
    assert agent.stop() == 0
    # Retry-After (1 s) is honoured up to the backoff cap (0.04 s here), above the jittered delay
    assert waits[0] == 0.04


def test_result_upload_is_retried_on_server_errors(fake_server, start):
    serve_tasks(fake_server, make_task(17))
    answers = [(202, {"accepted_for_aggregation": True}), (502, b"bad gateway"), (500, b"oops")]
    fake_server.on("POST", "/api/v1/tasks/17/result", lambda _r: answers.pop())
    agent = start(finish=True)
    assert agent.join() == 0
    assert len(fake_server.calls("POST", "/api/v1/tasks/17/result")) == 3
    assert agent.agent.tasks_done == 1


def test_idle_only_claims_only_when_the_machine_is_idle(fake_server, start):
    busy = {"reason": "CPU busy (90% >= 30%)"}
    agent = start(idle_only=True, idle_check=lambda: busy["reason"])
    fake_server.wait_for(lambda: len(fake_server.heartbeats()) >= 4, what="heartbeats")
    assert fake_server.claims() == []
    assert all(hb["state"] == "idle" for hb in fake_server.heartbeats())
    busy["reason"] = None
    fake_server.wait_for(lambda: fake_server.claims(), what="a claim once idle")
    assert agent.stop() == 0


def test_restart_reports_the_interrupted_task_as_failed(fake_server, start, worker_config):
    cfgmod.state_save(worker_config.path, {"task_id": 21, "deadline": future(600)})
    fake_server.on("POST", "/api/v1/tasks/21/fail", (200, {}))
    agent = start()
    fake_server.wait_for(lambda: fake_server.claims(), what="a claim")
    assert agent.stop() == 0
    paths = [r.path for r in fake_server.requests]
    assert paths.index("/api/v1/tasks/21/fail") < paths.index("/api/v1/tasks/claim")  # reported before claiming
    assert fake_server.calls("POST", "/api/v1/tasks/21/fail")[0].json == {"reason": "agent restarted"}
    assert cfgmod.state_load(worker_config.path) == {}


def test_restart_after_the_deadline_just_forgets_the_task(fake_server, start, worker_config):
    past = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    cfgmod.state_save(worker_config.path, {"task_id": 21, "deadline": past})
    agent = start()
    fake_server.wait_for(lambda: fake_server.claims(), what="a claim")
    assert agent.stop() == 0
    assert fake_server.calls("POST", "/api/v1/tasks/21/fail") == []
    assert cfgmod.state_load(worker_config.path) == {}


def test_restart_report_refused_by_the_server_is_dropped(fake_server, start, worker_config):
    cfgmod.state_save(worker_config.path, {"task_id": 21, "deadline": future(600)})
    fake_server.on("POST", "/api/v1/tasks/21/fail", (409, {"error": "invalid_state", "detail": "already re-issued"}))
    agent = start()
    fake_server.wait_for(lambda: fake_server.claims(), what="a claim")
    assert agent.stop() == 0
    assert len(fake_server.calls("POST", "/api/v1/tasks/21/fail")) == 1
    assert cfgmod.state_load(worker_config.path) == {}
