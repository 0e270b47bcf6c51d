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
    ServerError,
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
