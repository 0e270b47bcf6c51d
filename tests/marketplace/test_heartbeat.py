"""Heartbeats write presence to the cache, not the database; the sweep persists last_seen_at in bulk."""

from __future__ import annotations

from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone
from rest_framework.test import APIClient

from marketplace import presence
from marketplace.models import Worker
from marketplace.selectors import worker_live_state
from marketplace.tasks import sweep_offline
from tests.marketplace.factories import WorkerFactory, bearer

HEARTBEAT = "/api/v1/workers/heartbeat"


@pytest.mark.parametrize(("state", "live"), [("idle", "online"), ("busy", "busy"), ("paused", "paused")])
def test_heartbeat_records_presence(worker_client, worker, settings, state, live):
    settings.AGORA_HEARTBEAT_INTERVAL_S = 17
    body = {"state": state, "task_id": 3 if state == "busy" else None, "progress": 0.25 if state == "busy" else None}
    response = worker_client.post(HEARTBEAT, body, format="json")

    assert response.status_code == 200
    reply = response.json()
    assert {k: reply[k] for k in ("poll_after_s", "worker_state")} == {"poll_after_s": 17, "worker_state": live}
    assert reply["stop_task"] is (state == "busy")  # task 3 is not this worker's: there is none
    value = presence.presence_get(worker.pk)
    assert value["state"] == state
    assert value["task_id"] == body["task_id"] and value["progress"] == body["progress"]
    assert worker_live_state(worker) == live


def test_no_heartbeat_means_offline(worker):
    assert worker_live_state(worker) == "offline"


@pytest.mark.parametrize(("body", "field"), [
    ({}, "state"),
    ({"state": "sleeping"}, "state"),
    ({"state": "busy", "progress": 1.5}, "progress"),
    ({"state": "busy", "progress": -0.1}, "progress"),
    ({"state": "busy", "progress": "NaN"}, "progress"),
    ({"state": "busy", "task_id": "seven"}, "task_id"),
    ({"state": "busy", "task_id": 0}, "task_id"),
])
def test_bad_heartbeat_is_400_and_records_nothing(worker_client, worker, body, field):
    response = worker_client.post(HEARTBEAT, body, format="json")
    assert response.status_code == 400
    assert response.json()["detail"].startswith(field)
    assert presence.presence_get(worker.pk) is None


def test_heartbeat_does_not_write_the_database(worker_client, worker, django_assert_num_queries):
    with django_assert_num_queries(1):  # the token lookup, cold
        assert worker_client.post(HEARTBEAT, {"state": "idle"}, format="json").status_code == 200
    with django_assert_num_queries(1):  # whether task 1 is live for this worker, cold
        assert worker_client.post(HEARTBEAT, {"state": "busy", "task_id": 1}, format="json").status_code == 200
    with django_assert_num_queries(0):  # warm: cache only
        for _ in range(3):
            assert worker_client.post(HEARTBEAT, {"state": "busy", "task_id": 1, "progress": 0.5},
                                      format="json").status_code == 200
    worker.refresh_from_db()
    assert worker.last_seen_at is None


def test_token_cache_expires(worker_client, worker, django_assert_num_queries):
    worker_client.post(HEARTBEAT, {"state": "idle"}, format="json")
    with time_machine.travel(timezone.now() + timedelta(seconds=presence.TOKEN_CACHE_S + 1)):
        with django_assert_num_queries(1):
            assert worker_client.post(HEARTBEAT, {"state": "idle"}, format="json").status_code == 200


def test_offline_after_the_presence_ttl(worker_client, worker, settings):
    settings.AGORA_OFFLINE_AFTER_S = 5
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        worker_client.post(HEARTBEAT, {"state": "idle"}, format="json")
        assert worker_live_state(worker) == "online"
    with time_machine.travel(start + timedelta(seconds=4), tick=False):
        assert worker_live_state(worker) == "online"
    with time_machine.travel(start + timedelta(seconds=6), tick=False):
        assert worker_live_state(worker) == "offline"


def test_sweep_persists_last_seen_in_bulk_and_reports_offline(worker, other_worker, settings,
                                                             django_assert_num_queries):
    settings.AGORA_OFFLINE_AFTER_S = 60
    silent = WorkerFactory()
    start = timezone.now().replace(microsecond=0)
    with time_machine.travel(start, tick=False):
        for w in (worker, other_worker):
            client = APIClient()
            client.credentials(**bearer(w))
            client.post(HEARTBEAT, {"state": "idle"}, format="json")
    with time_machine.travel(start + timedelta(seconds=10), tick=False):
        with django_assert_num_queries(2):  # read active workers, one bulk UPDATE
            result = sweep_offline.apply().get()
        assert result["persisted"] == 2 and result["online"] == 2
        assert set(result["came_online"]) == {worker.pk, other_worker.pk}
        seen = dict(Worker.objects.values_list("id", "last_seen_at"))
        assert seen[worker.pk] == start and seen[other_worker.pk] == start and seen[silent.pk] is None

        again = sweep_offline.apply().get()  # idempotent: nothing newer to write
        assert again["persisted"] == 0 and again["went_offline"] == []

    with time_machine.travel(start + timedelta(seconds=61), tick=False):
        later = sweep_offline.apply().get()
    assert later["went_offline"] == sorted([worker.pk, other_worker.pk])
    assert later["online"] == 0


def test_sweep_task_is_registered_under_its_beat_name():
    from django.conf import settings

    from agora.celery import app

    app.loader.import_default_modules()
    assert "marketplace.sweep_offline" in app.tasks
    assert {"task": "marketplace.sweep_offline"}.items() <= settings.CELERY_BEAT_SCHEDULE[
        "marketplace-sweep-offline"].items()


def test_me_returns_own_record_and_live_state(worker_client, worker):
    worker_client.post(HEARTBEAT, {"state": "busy", "task_id": 9, "progress": 0.4}, format="json")
    body = worker_client.get("/api/v1/workers/me").json()
    assert body["id"] == worker.pk and body["name"] == worker.name
    assert body["live_state"] == "busy" and body["task_id"] == 9 and body["progress"] == 0.4
    assert body["status"] == "active" and body["credits"] == "0.0000"
    assert body["last_seen"] is not None
    assert "token_hash" not in body and "email" not in str(body)


def test_heartbeat_rate_limit_keys_on_the_worker(worker, other_worker, settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {
        **settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "heartbeat": "3/min"}}
    first, second = APIClient(), APIClient()
    first.credentials(**bearer(worker))
    second.credentials(**bearer(other_worker))
    start = timezone.now().replace(second=10, microsecond=0)  # well inside one minute window
    with time_machine.travel(start, tick=False):
        codes = [first.post(HEARTBEAT, {"state": "idle"}, format="json").status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        throttled = first.post(HEARTBEAT, {"state": "idle"}, format="json")
        assert throttled.json()["error"] == "throttled"
        assert int(throttled["Retry-After"]) == 50
        # Same address, another worker: its own budget.
        assert second.post(HEARTBEAT, {"state": "idle"}, format="json").status_code == 200
    with time_machine.travel(start + timedelta(minutes=1), tick=False):
        assert first.post(HEARTBEAT, {"state": "idle"}, format="json").status_code == 200


def test_enroll_rate_limit(api_client, settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {
        **settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "enroll": "2/min"}}
    codes = [api_client.post("/api/v1/workers/enroll", {}, format="json").status_code for _ in range(3)]
    assert codes == [400, 400, 429]
