"""Worker calls survive a Redis outage: a Redis of the test's own (never the machine's) is killed -9 or
hung, and heartbeat, claim, result upload, fail and the member pages still answer without a 5xx."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient, APIRequestFactory

from marketplace import presence
from marketplace.selectors import worker_live_state
from marketplace.services import worker_revoke, worker_sweep_offline
from tests.marketplace.factories import WorkerFactory, bearer
from tests.redisproc import redis_proc  # noqa: F401  (fixture)
from tests.training.factories import approved_proposal, train_update
from training import blobs, services
from training.models import Task
from training.serializers import task_payload

pytestmark = pytest.mark.django_db

HEARTBEAT = "/api/v1/workers/heartbeat"


@pytest.fixture
def own_cache(redis_proc, settings):  # noqa: F811
    """Point the cache (presence, token cache, throttles) at the test's own Redis."""
    settings.CACHES = redis_proc.caches(key_prefix="outage")
    yield redis_proc


@pytest.fixture
def blob_store(settings, tmp_path):
    settings.STORAGES = {**settings.STORAGES, "checkpoints": {
        "BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": str(tmp_path / "blobs")}}}
    blobs.clear_caches()
    yield
    blobs.clear_caches()


@pytest.fixture
def strict_rates(settings):
    """A heartbeat limit a test can exceed in two requests: fail-open must be visible, not incidental."""
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {
        **settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "heartbeat": "1/min"}}


def _client(worker) -> APIClient:
    client = APIClient()
    client.credentials(**bearer(worker))
    return client


def _heartbeat(worker, state="idle"):
    return _client(worker).post(HEARTBEAT, {"state": state}, format="json")


def test_worker_calls_and_member_pages_work_through_a_killed_redis(own_cache, blob_store, member, client, caplog):
    run = services.run_start(proposal_id=approved_proposal(diloco={"workers_per_round": 2}).pk)
    alice = WorkerFactory(owner=member, gpus=[], cuda_version="")
    bob = WorkerFactory(gpus=[], cuda_version="")
    assert _heartbeat(alice).status_code == 200  # warm: token facts and presence are in Redis
    assert worker_live_state(alice) == "online"

    own_cache.kill()
    with caplog.at_level(logging.WARNING, logger="marketplace.presence"):
        beat = _heartbeat(alice, "busy")
        claimed = _client(alice).post("/api/v1/tasks/claim")
        bob_claimed = _client(bob).post("/api/v1/tasks/claim")

    assert beat.status_code == 200, beat.content
    assert beat.json()["worker_state"] == "busy"
    assert "cache unavailable" in caplog.text
    assert claimed.status_code == 200, claimed.content
    assert bob_claimed.status_code == 200, bob_claimed.content

    task = Task.objects.get(pk=claimed.json()["id"])
    data, metrics = train_update(task_payload(task, request=APIRequestFactory().get("/"), guardrails=[],
                                              max_upload_bytes=0))
    uploaded = _client(alice).post(f"/api/v1/tasks/{task.pk}/result", {
        "update": SimpleUploadedFile("update.safetensors", data), "metrics": json.dumps(metrics)}, format="multipart")
    assert uploaded.status_code == 202, uploaded.content
    task.refresh_from_db()
    assert task.status == Task.Status.COMPLETED

    failed = _client(bob).post(f"/api/v1/tasks/{bob_claimed.json()['id']}/fail", {"reason": "power cut"},
                               format="json")
    assert failed.status_code == 200, failed.content

    # Presence is unknown, not "offline"; pages that show it still render.
    me = _client(alice).get("/api/v1/workers/me")
    assert me.status_code == 200 and me.json()["live_state"] == "unknown"
    assert worker_live_state(alice) == "unknown"
    assert worker_sweep_offline()["presence_unknown"] is True
    client.force_login(member)
    for path in ("/", "/workers/", "/workers/mine/", f"/runs/{run.pk}/", "/api/v1/workers/"):
        response = client.get(path)
        assert response.status_code == 200, (path, response.status_code)

    # Back up (empty, as a crashed cache comes back): the next heartbeat restores presence.
    own_cache.start()
    assert _heartbeat(alice).status_code == 200
    assert worker_live_state(alice) == "online"


def test_revoking_a_worker_during_an_outage_takes_effect_at_once(own_cache, member):
    worker = WorkerFactory(owner=member)
    assert _heartbeat(worker).status_code == 200  # its token facts are cached
    own_cache.kill()

    worker_revoke(worker=worker, by=member)

    response = _heartbeat(worker)
    assert response.status_code == 401 and response.json()["error"] == "invalid_token"


def test_rate_limits_fail_open_with_a_warning_while_redis_is_down(own_cache, strict_rates, caplog):
    worker = WorkerFactory()
    presence._warned_at = 0.0
    assert _heartbeat(worker).status_code == 200
    assert _heartbeat(worker).status_code == 429  # the limit is real while Redis is up

    own_cache.kill()
    with caplog.at_level(logging.WARNING, logger="marketplace.presence"):
        assert [_heartbeat(worker).status_code for _ in range(3)] == [200, 200, 200]
    assert "cache unavailable" in caplog.text


def test_a_hung_redis_costs_a_socket_timeout_not_a_failed_call(own_cache, settings):
    """SIGSTOP: connections are accepted but never answered. The client's socket timeout (the same
    setting production uses) turns that into an error the callers absorb."""
    settings.CACHES = own_cache.caches(key_prefix="outage", timeout_s=0.2)
    worker = WorkerFactory()
    own_cache.pause()
    try:
        response = _heartbeat(worker)
    finally:
        own_cache.resume()
    assert response.status_code == 200, response.content


def test_production_settings_give_the_redis_cache_short_socket_timeouts(tmp_path):
    code = ("import django, json; django.setup(); from django.conf import settings; "
            "print(json.dumps(settings.CACHES['default']['OPTIONS']))")

    def options(**extra):
        env = {k: v for k, v in os.environ.items() if k != "AGORA_CACHE_TIMEOUT_S"}
        env.update(DJANGO_SETTINGS_MODULE="agora.settings", DJANGO_SECRET_KEY="test", AGORA_VAR_DIR=str(tmp_path),
                   REDIS_URL="redis://127.0.0.1:1/0", **extra)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    assert options() == {"socket_connect_timeout": 0.5, "socket_timeout": 0.5}
    assert options(AGORA_CACHE_TIMEOUT_S="2") == {"socket_connect_timeout": 2.0, "socket_timeout": 2.0}
