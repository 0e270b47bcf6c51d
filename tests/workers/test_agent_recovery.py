"""What the agent does when things go wrong: results kept on disk and delivered until the deadline (across
restarts), one agent per config folder, deadlines in server time whatever the local clock says, and the
server's ``stop_task``."""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from tests.workers.conftest import make_task
from tests.workers.fakeserver import DROP, answers
from tests.workers.test_agent import METRICS, FakeRunner, Running, serve_tasks
from workers import config as cfgmod
from workers.agent import EXIT_LOCKED, Agent, AgentOptions
from workers.client import Client, ServerClock

UNAVAILABLE = (503, {"error": "unavailable", "detail": "the database is restarting"})


def server_deadline(fake_server, seconds: float) -> str:
    """A deadline ``seconds`` from now on the fake server's clock."""
    return datetime.fromtimestamp(fake_server.now() + seconds, UTC).isoformat(timespec="milliseconds")


@pytest.fixture
def start(worker_config):
    running: list[Running] = []

    def start(runner=None, client=None, **options) -> Running:
        opts = AgentOptions(min_poll_s=0.02, backoff_base_s=0.01, backoff_cap_s=0.04, pause_check_s=0.01,
                            **options)
        agent = Agent(worker_config, runner=runner or FakeRunner(), client=client, options=opts)
        running.append(Running(agent))
        return running[-1]

    yield start
    for r in running:
        r.agent.request_abort()
        r.thread.join(10)


def skewed_client(worker_config, skew_s: float) -> Client:
    """A client whose machine's wall clock is ``skew_s`` seconds off."""
    return Client(worker_config.server, worker_config.worker_token,
                  clock=ServerClock(wall=lambda: time.time() + skew_s))


def result_calls(fake_server, task_id=17):
    return fake_server.calls("POST", f"/api/v1/tasks/{task_id}/result")


# --- the pending result ---------------------------------------------------------------------------


def test_a_result_the_server_cannot_take_is_kept_on_disk_and_delivered_after_a_restart(fake_server, start,
                                                                                      worker_config):
    serve_tasks(fake_server, make_task(17))
    fake_server.on("POST", "/api/v1/tasks/17/result", UNAVAILABLE)
    first = start()
    fake_server.wait_for(lambda: len(result_calls(fake_server)) >= 3, what="upload retries")
    manifest = cfgmod.pending_manifest(worker_config.path)
    assert manifest["task_id"] == 17 and {k: manifest["metrics"][k] for k in METRICS} == METRICS
    assert cfgmod.pending_update_path(worker_config.path).read_bytes() == b"UPDATE"
    assert cfgmod.state_load(worker_config.path) == {}  # the task is finished; the result speaks for it
    first.agent.request_stop()
    first.agent.request_stop()  # the second stop gives up waiting, not the result
    assert first.join() == 0
    assert cfgmod.pending_load(worker_config.path).update == b"UPDATE"
    assert fake_server.calls("POST", "/api/v1/tasks/17/fail") == []

    fake_server.on("POST", "/api/v1/tasks/17/result", (202, {"accepted_for_aggregation": True}))
    fake_server.on("POST", "/api/v1/tasks/claim", (204, None))
    n = len(result_calls(fake_server))
    second = start()
    fake_server.wait_for(lambda: fake_server.claims()[1:], what="claiming after the delivery")
    assert second.stop() == 0
    delivered = result_calls(fake_server)[n:]
    assert len(delivered) == 1
    assert delivered[0].form["update"] == b"UPDATE" and json.loads(delivered[0].form["metrics"]) == manifest["metrics"]
    assert fake_server.calls("POST", "/api/v1/tasks/17/fail") == []  # delivered, not reported as failed
    assert second.agent.tasks_done == 1
    assert cfgmod.pending_manifest(worker_config.path) is None
    assert not cfgmod.pending_update_path(worker_config.path).exists()
    # while it delivered, the restarted agent told the server it still has the task
    assert {"state": "busy", "task_id": 17, "progress": 1.0} in fake_server.heartbeats()


def test_delivery_is_retried_through_flaky_failures(fake_server, start, worker_config):
    serve_tasks(fake_server, make_task(17))
    fake_server.on("POST", "/api/v1/tasks/17/result",
                   answers(DROP, UNAVAILABLE, (502, b"bad gateway"), (429, {"error": "throttled", "detail": ""}),
                           DROP, UNAVAILABLE, DROP, UNAVAILABLE, DROP, UNAVAILABLE,  # more than report_attempts
                           then=(202, {"accepted_for_aggregation": True})))
    agent = start(finish=True)
    assert agent.join() == 0
    assert len(result_calls(fake_server)) == 11
    assert agent.agent.tasks_done == 1
    assert cfgmod.pending_manifest(worker_config.path) is None


def test_delivery_is_retried_until_the_deadline_in_server_time_then_given_up(fake_server, start, worker_config,
                                                                             caplog):
    caplog.set_level(logging.WARNING, "agora.worker")
    fake_server.clock_offset_s = 7200.0  # server time is two hours ahead of this machine's clock
    deadline = fake_server.now() + 1.5
    serve_tasks(fake_server, make_task(17, deadline=server_deadline(fake_server, 1.5)))
    seen = []
    fake_server.on("POST", "/api/v1/tasks/17/result", lambda _r: (seen.append(fake_server.now()), UNAVAILABLE)[1])
    agent = start()
    fake_server.wait_for(lambda: "discarding its result" in caplog.text, what="giving up", timeout=30)
    fake_server.wait_for(lambda: len(fake_server.claims()) >= 2, what="claiming again")
    assert agent.stop() == 0
    assert len(seen) > AgentOptions().report_attempts  # bounded by the deadline, not by a number of tries
    assert max(seen) < deadline + 1.0  # the server's deadline, not this machine's (two hours earlier)
    assert "deadline" in caplog.text and "has passed" in caplog.text
    assert cfgmod.pending_manifest(worker_config.path) is None
    assert fake_server.calls("POST", "/api/v1/tasks/17/fail") == []
    assert agent.agent.tasks_done == 0


@pytest.mark.parametrize("answer", [
    (410, {"error": "task_expired", "detail": "task 17 expired; it was given to another worker"}),
    (409, {"error": "task_completed", "detail": "task 17 already has a result"}),
    (404, {"error": "not_found", "detail": "there is no task 17"}),
    (403, {"error": "not_your_task", "detail": "task 17 is not assigned to this worker"}),
])
def test_a_result_the_server_no_longer_wants_is_discarded_once(fake_server, start, worker_config, caplog, answer):
    caplog.set_level(logging.WARNING, "agora.worker")
    serve_tasks(fake_server, make_task(17))
    fake_server.on("POST", "/api/v1/tasks/17/result", answer)
    agent = start()
    fake_server.wait_for(lambda: len(fake_server.claims()) >= 2, what="claiming again")
    assert agent.stop() == 0  # a 403 about the task is not a refused token: the agent goes on
    assert len(result_calls(fake_server)) == 1
    assert "no longer wants this result" in caplog.text and answer[1]["error"] in caplog.text
    assert cfgmod.pending_manifest(worker_config.path) is None
    assert fake_server.calls("POST", "/api/v1/tasks/17/fail") == []


def test_a_result_left_on_disk_past_its_deadline_is_dropped_on_start(fake_server, start, worker_config):
    past = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    cfgmod.pending_save(worker_config.path, cfgmod.PendingResult(task_id=21, deadline=past, metrics=METRICS,
                                                                 update=b"OLD"))
    fake_server.on("POST", "/api/v1/tasks/21/result", UNAVAILABLE)
    agent = start()
    fake_server.wait_for(lambda: fake_server.claims(), what="a claim")
    assert agent.stop() == 0
    # one try at most (before the first reply its clock is only an estimate), no retries, no failure report
    assert len(result_calls(fake_server, 21)) <= 1 and fake_server.calls("POST", "/api/v1/tasks/21/fail") == []
    assert cfgmod.pending_manifest(worker_config.path) is None


def test_a_damaged_result_on_disk_is_not_delivered(fake_server, start, worker_config):
    cfgmod.pending_save(worker_config.path, cfgmod.PendingResult(task_id=21, deadline=None, metrics=METRICS,
                                                                 update=b"GOOD"))
    cfgmod.pending_update_path(worker_config.path).write_bytes(b"GOOX")  # a torn or corrupted write
    agent = start()
    fake_server.wait_for(lambda: fake_server.claims(), what="a claim")
    assert agent.stop() == 0
    assert result_calls(fake_server, 21) == []
    assert cfgmod.pending_manifest(worker_config.path) is None


# --- one agent per folder -------------------------------------------------------------------------


def test_the_lock_refuses_a_second_agent_on_the_same_folder(fake_server, start, worker_config):
    gate = threading.Event()
    serve_tasks(fake_server, make_task(17))
    first = start(runner=FakeRunner(gate=gate))
    fake_server.wait_for(lambda: any(hb["state"] == "busy" for hb in fake_server.heartbeats()), what="busy")
    second = start()
    assert second.join() == EXIT_LOCKED
    assert "already running" in second.agent.stop_message and worker_config.path.parent.name in \
        second.agent.stop_message
    assert cfgmod.state_load(worker_config.path)["task_id"] == 17  # the running agent's task is untouched
    gate.set()
    fake_server.wait_for(lambda: result_calls(fake_server), what="the first agent's result")
    assert first.stop() == 0
    assert all(not r.path.endswith("/fail") for r in fake_server.requests)


def test_a_restart_right_after_a_graceful_stop_never_reports_the_task_as_failed(fake_server, start,
                                                                                worker_config):
    gate = threading.Event()
    serve_tasks(fake_server, make_task(17))
    first = start(runner=FakeRunner(gate=gate))
    fake_server.wait_for(lambda: any(hb["state"] == "busy" for hb in fake_server.heartbeats()), what="busy")
    first.agent.request_stop()  # graceful: finish task 17, then exit
    assert start().join() == EXIT_LOCKED  # restarted at once: the first one is still finishing
    gate.set()
    assert first.join() == 0
    fake_server.on("POST", "/api/v1/tasks/claim", (204, None))
    again = start()
    fake_server.wait_for(lambda: len(fake_server.claims()) >= 2, what="the restarted agent claiming")
    assert again.stop() == 0
    assert len(result_calls(fake_server)) == 1
    assert fake_server.calls("POST", "/api/v1/tasks/17/fail") == []


# --- server time and stop_task --------------------------------------------------------------------


@pytest.mark.parametrize("server_time", [True, False], ids=["server_time", "date_header_only"])
def test_a_clock_behind_still_notices_the_deadline_and_stops_training(fake_server, start, worker_config, caplog,
                                                                      server_time):
    caplog.set_level(logging.WARNING, "agora.worker")
    fake_server.send_server_time = server_time
    runner = FakeRunner(steps=1_000_000, step_s=0.005)
    serve_tasks(fake_server, make_task(17, deadline=server_deadline(fake_server, 1.5)))
    agent = start(runner=runner, client=skewed_client(worker_config, -3600))  # by its clock, an hour to go
    fake_server.wait_for(lambda: len(fake_server.claims()) >= 2, what="claiming after the deadline", timeout=30)
    steps = runner.steps_done
    assert agent.stop() == 0
    assert 0 < steps < 1_000_000 and runner.steps_done == steps  # training stopped at the deadline
    assert "task 17 stopped: its deadline" in caplog.text
    assert result_calls(fake_server) == [] and fake_server.calls("POST", "/api/v1/tasks/17/fail") == []
    assert cfgmod.state_load(worker_config.path) == {}


def test_a_clock_ahead_does_not_give_up_a_task_the_server_still_wants(fake_server, start, worker_config):
    serve_tasks(fake_server, make_task(17, deadline=server_deadline(fake_server, 600)))
    agent = start(client=skewed_client(worker_config, +3600), finish=True)  # by its clock, long past
    assert agent.join() == 0
    assert len(result_calls(fake_server)) == 1 and agent.agent.tasks_done == 1


def test_stop_task_in_a_heartbeat_aborts_training_and_the_agent_claims_again(fake_server, start, worker_config,
                                                                            caplog):
    caplog.set_level(logging.WARNING, "agora.worker")
    runner = FakeRunner(steps=1_000_000, step_s=0.002)
    serve_tasks(fake_server, make_task(17))
    agent = start(runner=runner)
    fake_server.wait_for(lambda: runner.steps_done > 0, what="training")
    fake_server.stop_task(17, "round 1 of run 4 was aggregated without this task")
    fake_server.wait_for(lambda: len(fake_server.claims()) >= 2, what="claiming again")
    steps = runner.steps_done
    assert agent.stop() == 0
    assert steps < 1_000_000 and runner.steps_done == steps
    assert "round 1 of run 4 was aggregated without this task" in caplog.text
    assert result_calls(fake_server) == [] and fake_server.calls("POST", "/api/v1/tasks/17/fail") == []
    assert cfgmod.state_load(worker_config.path) == {}
    assert fake_server.heartbeats()[-1]["state"] == "idle"


def test_stop_task_while_paused_mid_task_abandons_it(fake_server, start, worker_config):
    runner = FakeRunner(steps=1_000_000, step_s=0.002)
    serve_tasks(fake_server, make_task(17))
    agent = start(runner=runner)
    fake_server.wait_for(lambda: runner.steps_done > 0, what="training")
    cfgmod.set_paused(worker_config.path, True)
    fake_server.wait_for(lambda: any(h["state"] == "paused" and h["task_id"] == 17 for h in fake_server.heartbeats()),
                         what="paused mid-task")
    fake_server.stop_task(17, "run canceled")
    fake_server.wait_for(lambda: fake_server.heartbeats()[-1] == {"state": "paused", "task_id": None,
                                                                  "progress": None}, what="task dropped")
    assert agent.stop() == 0
    assert result_calls(fake_server) == [] and fake_server.calls("POST", "/api/v1/tasks/17/fail") == []


def test_stop_task_while_the_result_waits_discards_it(fake_server, start, worker_config):
    serve_tasks(fake_server, make_task(17))
    fake_server.on("POST", "/api/v1/tasks/17/result", UNAVAILABLE)
    agent = start()
    fake_server.wait_for(lambda: len(result_calls(fake_server)) >= 2, what="upload retries")
    fake_server.stop_task(17, "round closed")
    fake_server.wait_for(lambda: len(fake_server.claims()) >= 2, what="claiming again")
    n = len(result_calls(fake_server))
    fake_server.wait_for(lambda: len(fake_server.claims()) >= 4, what="more claims")
    assert agent.stop() == 0
    assert len(result_calls(fake_server)) == n  # no more tries
    assert cfgmod.pending_manifest(worker_config.path) is None


@pytest.mark.parametrize("skew_s,deadline_in_s,reported", [(+3600, 600, True), (-3600, -5, False)],
                         ids=["clock_ahead_task_still_live", "clock_behind_task_expired"])
def test_a_restart_judges_the_interrupted_tasks_deadline_by_the_servers_clock(fake_server, start, worker_config,
                                                                              skew_s, deadline_in_s, reported):
    cfgmod.state_save(worker_config.path, {"task_id": 21, "deadline": server_deadline(fake_server, deadline_in_s)})
    fake_server.on("POST", "/api/v1/tasks/21/fail", (200, {}))
    agent = start(client=skewed_client(worker_config, skew_s))
    fake_server.wait_for(lambda: fake_server.claims(), what="a claim")
    assert agent.stop() == 0
    assert len(fake_server.calls("POST", "/api/v1/tasks/21/fail")) == (1 if reported else 0)
    assert cfgmod.state_load(worker_config.path) == {}
