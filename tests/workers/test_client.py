import hashlib
import socket

import pytest

from tests.workers.fakeserver import DROP
from workers.client import (
    AuthError,
    Client,
    DownloadError,
    NetworkError,
    ProtocolError,
    ServerClock,
    ServerError,
    TaskGone,
    Throttled,
)


@pytest.fixture
def client(fake_server):
    with Client(fake_server.url, "wkr_secret", timeout=5) as c:
        yield c


def test_heartbeat_sends_bearer_token_and_state(fake_server, client):
    answer = client.heartbeat(state="busy", task_id=3, progress=0.25)
    assert answer["poll_after_s"] == 0
    rec = fake_server.calls("POST", "/api/v1/workers/heartbeat")[0]
    assert rec.headers["Authorization"] == "Bearer wkr_secret"
    assert rec.headers["User-Agent"].startswith("agora-worker/")
    assert rec.json == {"state": "busy", "task_id": 3, "progress": 0.25}


def test_claim_204_is_none_and_200_is_the_task(fake_server, client):
    assert client.claim() is None
    fake_server.on("POST", "/api/v1/tasks/claim", (200, {"id": 9}))
    assert client.claim() == {"id": 9}


def test_401_is_an_auth_error_with_the_servers_detail(fake_server, client):
    fake_server.on("POST", "/api/v1/workers/heartbeat",
                   (401, {"error": "invalid_token", "detail": "The worker token is unknown or was revoked."}))
    with pytest.raises(AuthError) as info:
        client.heartbeat(state="idle")
    assert info.value.status == 401 and info.value.error == "invalid_token"
    assert "revoked" in info.value.explain() and "agora-worker enroll" in info.value.explain()
    assert not info.value.retryable


def test_403_suspended_explains_suspension(fake_server, client):
    fake_server.on("POST", "/api/v1/tasks/claim", (403, {"error": "worker_suspended", "detail": "too many bad updates"}))
    with pytest.raises(AuthError) as info:
        client.claim()
    assert "suspended" in info.value.explain() and "too many bad updates" in info.value.explain()


def test_5xx_and_429_are_retryable_other_4xx_are_not(fake_server, client):
    fake_server.on("POST", "/api/v1/tasks/claim", (503, b"<html>down</html>"))
    with pytest.raises(ServerError) as info:
        client.claim()
    assert info.value.retryable and info.value.error == "http_503"
    fake_server.on("POST", "/api/v1/tasks/claim", (429, {"error": "throttled", "detail": "slow down"},
                                                   {"Retry-After": "7"}))
    with pytest.raises(Throttled) as info:
        client.claim()
    assert info.value.retryable and info.value.retry_after == 7.0
    fake_server.on("POST", "/api/v1/tasks/9/fail", (409, {"error": "invalid_state", "detail": "task is done"}))
    with pytest.raises(ProtocolError) as info:
        client.report_failure(9, reason="x")
    assert not info.value.retryable and info.value.detail == "task is done"


def test_unreachable_server_and_dropped_connections_are_network_errors(fake_server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Client(f"http://127.0.0.1:{port}", "t", timeout=2) as c, pytest.raises(NetworkError) as info:
        c.heartbeat(state="idle")
    assert info.value.retryable and "cannot reach" in str(info.value)
    fake_server.on("POST", "/api/v1/workers/heartbeat", DROP)
    with Client(fake_server.url, "t", timeout=2) as c, pytest.raises(NetworkError):
        c.heartbeat(state="idle")


def test_result_is_multipart_update_and_metrics_json(fake_server, client):
    fake_server.on("POST", "/api/v1/tasks/5/result", (202, {"accepted_for_aggregation": True}))
    metrics = {"loss_start": 5.5, "loss_end": 4.0, "steps": 3, "tokens": 96, "seconds": 0.5}
    assert client.submit_result(5, update=b"\x00update", metrics=metrics) == {"accepted_for_aggregation": True}
    rec = fake_server.calls("POST", "/api/v1/tasks/5/result")[0]
    assert rec.form["update"] == b"\x00update"
    import json

    assert json.loads(rec.form["metrics"]) == metrics


def test_nonfinite_metrics_are_refused_before_sending(client):
    with pytest.raises(ValueError):
        client.submit_result(5, update=b"x", metrics={"loss_end": float("nan")})


def test_checkpoint_download_verifies_sha256(fake_server, client, tmp_path):
    data = b"weights" * 1000
    sha = hashlib.sha256(data).hexdigest()
    fake_server.on("GET", f"/api/v1/checkpoints/{sha}", (200, data))
    dest = tmp_path / "ck" / f"{sha}.safetensors"
    client.download_checkpoint(sha, dest)
    assert dest.read_bytes() == data

    wrong = "a" * 64
    fake_server.on("GET", f"/api/v1/checkpoints/{wrong}", (200, data))
    bad = tmp_path / "ck" / f"{wrong}.safetensors"
    with pytest.raises(DownloadError):
        client.download_checkpoint(wrong, bad)
    assert not bad.exists()
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [dest.name]  # no partial files left


def test_checkpoint_url_is_only_followed_on_the_same_server(client):
    sha = "b" * 64
    assert client.checkpoint_path(sha, "/api/v1/checkpoints/" + sha) == "/api/v1/checkpoints/" + sha
    assert client.checkpoint_path(sha, client.server + "/media/ck/" + sha) == "/media/ck/" + sha
    assert client.checkpoint_path(sha, "https://elsewhere.example/" + sha) == "/api/v1/checkpoints/" + sha
    assert client.checkpoint_path(sha, "//elsewhere.example/x") == "/api/v1/checkpoints/" + sha
    assert client.checkpoint_path(sha, None) == "/api/v1/checkpoints/" + sha


# --- the server's clock ---------------------------------------------------------------------------


class FakeSteady:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_server_clock_follows_the_wall_clock_until_the_first_reply_then_the_server():
    steady = FakeSteady()
    clock = ServerClock(wall=lambda: 5_000.0, steady=steady)
    assert not clock.synced and clock.now() == 5_000.0
    clock.assume_wall_offset(-30.0)  # what the previous run of the agent had learnt
    assert clock.now() == 4_970.0
    clock.observe(1_000.0, uncertainty=0.01, received_at=steady())
    assert clock.synced and clock.now() == pytest.approx(1_000.005)
    steady.t += 60  # a minute later by the steady clock, whatever the wall clock does
    assert clock.now() == pytest.approx(1_060.005)
    assert clock.wall_offset() == pytest.approx(1_060.005 - 5_000.0)


def test_a_coarse_date_header_never_blurs_a_precise_reading_it_agrees_with_but_corrects_a_wrong_one():
    steady = FakeSteady()
    clock = ServerClock(wall=lambda: 0.0, steady=steady)
    clock.observe(1_000.25, uncertainty=0.002, received_at=steady())
    steady.t += 0.5
    clock.observe_date_header("Thu, 01 Jan 1970 00:16:40 GMT", rtt=0.01, received_at=steady())  # 1000 s
    assert clock.now() == pytest.approx(1_000.751)  # kept: 1000.751 lies within [1000, 1001.01]
    clock.observe_date_header("Thu, 01 Jan 1970 00:20:00 GMT", rtt=0.01, received_at=steady())  # 1200 s
    assert 1_200.0 <= clock.now() <= 1_201.01  # the machine slept or the server's clock was stepped
    clock.observe_server_time("1970-01-01T00:20:00.700Z", rtt=0.004, received_at=steady())
    assert clock.now() == pytest.approx(1_200.7025)  # tighter than the Date header: taken
    for junk in ("yesterday", "", None, 17, "9999-99-99T00:00:00Z"):
        clock.observe_server_time(junk, rtt=0.0)
        clock.observe_date_header(junk if isinstance(junk, str) else None, rtt=0.0)
    assert clock.now() == pytest.approx(1_200.7025)


@pytest.mark.parametrize("server_time", [True, False], ids=["server_time", "date_header_only"])
def test_replies_set_the_clock_of_a_machine_whose_wall_clock_is_wrong(fake_server, server_time):
    fake_server.clock_offset_s = -86_400.0  # the server is a day behind this machine (or this machine ahead)
    fake_server.send_server_time = server_time
    clock = ServerClock()
    with Client(fake_server.url, "wkr_secret", timeout=5, clock=clock) as c:
        answer = c.heartbeat(state="idle")
        assert ("server_time" in answer) == server_time
        assert clock.synced
        assert abs(clock.now() - fake_server.now()) < (0.25 if server_time else 1.5)
        assert c.clone().clock is clock  # the heartbeat thread's connection shares it


@pytest.mark.parametrize("status,error", [(404, "not_found"), (409, "task_completed"), (410, "task_expired"),
                                          (403, "not_your_task")])
def test_task_calls_say_when_the_server_no_longer_wants_the_task(fake_server, client, status, error):
    fake_server.on("POST", "/api/v1/tasks/5/result", (status, {"error": error, "detail": "no"}))
    fake_server.on("POST", "/api/v1/tasks/5/fail", (status, {"error": error, "detail": "no"}))
    with pytest.raises(TaskGone):
        client.submit_result(5, update=b"x", metrics={"loss_end": 1.0})
    with pytest.raises(TaskGone):
        client.report_failure(5, reason="x")
    fake_server.on("POST", "/api/v1/tasks/5/fail", (403, {"error": "worker_suspended", "detail": "no"}))
    with pytest.raises(AuthError):  # about the worker, not the task
        client.report_failure(5, reason="x")


def test_an_accepted_result_with_a_body_that_is_not_json_still_counts(fake_server, client):
    fake_server.on("POST", "/api/v1/tasks/5/result", (202, b"<html>Accepted</html>"))
    assert client.submit_result(5, update=b"x", metrics={"loss_end": 1.0}) == {}
