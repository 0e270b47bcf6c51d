"""Numbers a worker sends (enrollment hardware and benchmark, heartbeat task id and progress) are finite
and within bounds, refused by field name; what is accepted lands in the ledger exactly and verifies."""

from __future__ import annotations

import pytest

from ledger.models import Entry
from ledger.selectors import ledger_verify
from marketplace import presence
from marketplace.models import EnrollmentToken, Worker
from marketplace.services import enrollment_token_create

ENROLL = "/api/v1/workers/enroll"
HEARTBEAT = "/api/v1/workers/heartbeat"
ID_MAX = 2**63 - 1


@pytest.fixture
def token(member):
    return enrollment_token_create(owner=member, name="rig").token


def _raw_body(token: str, **spelled: str) -> str:
    """An enrollment body as JSON text with some numbers spelled exactly (``1.7e308``, ``1e16``)."""
    values = {"gpu_mb": "24576", "cpu_count": "16", "memory_mb": "65536", "tflops": "35.5", "mem_gbps": "900.0",
              **spelled}
    return (f'{{"enrollment_token": "{token}", "name": "rig", "agent_version": "0.1.0",'
            f'"hardware": {{"gpus": [{{"name": "RTX", "memory_mb": {values["gpu_mb"]}}}],'
            f'"cpu_count": {values["cpu_count"]}, "memory_mb": {values["memory_mb"]}, "torch": "2.13.0",'
            f'"cuda": "12.4"}},'
            f'"benchmark": {{"tflops": {values["tflops"]}, "mem_gbps": {values["mem_gbps"]}}}}}')


@pytest.mark.parametrize(("field", "key", "text"), [
    ("benchmark.tflops", "tflops", "1.7e308"),
    ("benchmark.tflops", "tflops", "1e16"),
    ("benchmark.tflops", "tflops", "10000000.5"),
    ("benchmark.mem_gbps", "mem_gbps", "123456789012345678901234567890"),
    ("benchmark.mem_gbps", "mem_gbps", "-0.5"),
    ("hardware.memory_mb", "memory_mb", "1000000000000000000000000000000"),
    ("hardware.memory_mb", "memory_mb", "1e300"),
    ("hardware.memory_mb", "memory_mb", "1.5"),
    ("hardware.cpu_count", "cpu_count", "100001"),
    ("hardware.cpu_count", "cpu_count", "true"),
    ("hardware.gpus", "gpu_mb", "1e16"),
    ("hardware.gpus", "gpu_mb", "10000001"),
])
def test_enroll_number_out_of_bounds_is_a_400_naming_it(api_client, token, field, key, text):
    response = api_client.post(ENROLL, _raw_body(token, **{key: text}), content_type="application/json")

    assert response.status_code == 400, response.content
    error = response.json()
    assert error["detail"].startswith(field) and any(name.startswith(field) for name in error["fields"]), error
    assert not Worker.objects.exists()
    assert EnrollmentToken.objects.get().used_at is None
    assert not Entry.objects.exists()


def test_enroll_at_the_bounds_is_recorded_exactly(api_client, token):
    body = _raw_body(token, gpu_mb="10000000", cpu_count="100000", memory_mb="1000000000", tflops="1e7",
                     mem_gbps="5e-324")
    response = api_client.post(ENROLL, body, content_type="application/json")

    assert response.status_code == 201, response.content
    hardware = Entry.objects.get(action="worker.enrolled").payload["hardware"]
    assert hardware["memory_mb"] == 10**9 and hardware["gpus"][0]["memory_mb"] == 10**7
    assert hardware["benchmark_tflops"] == 1e7 and isinstance(hardware["benchmark_tflops"], float)
    assert hardware["benchmark_mem_gbps"] == 5e-324
    assert ledger_verify().ok


def test_enroll_name_that_no_database_can_store_is_refused(api_client, token):
    body = _raw_body(token).replace('"name": "rig"', '"name": "rig\\ud800"')
    response = api_client.post(ENROLL, body, content_type="application/json")
    assert response.status_code == 400 and "name" in response.json()["detail"]
    assert not Worker.objects.exists() and not Entry.objects.exists()


@pytest.mark.parametrize(("field", "body"), [
    ("task_id", '{"state": "busy", "task_id": 9223372036854775808}'),
    ("task_id", '{"state": "busy", "task_id": 1e300}'),
    ("task_id", '{"state": "busy", "task_id": 3.5}'),
    ("progress", '{"state": "busy", "task_id": 1, "progress": 1.7e308}'),
    ("progress", '{"state": "busy", "task_id": 1, "progress": 1e16}'),
    ("progress", '{"state": "busy", "task_id": 1, "progress": true}'),
    ("progress", '{"state": "busy", "task_id": 1, "progress": "0.5"}'),
])
def test_heartbeat_number_out_of_bounds_is_a_400_naming_it(worker_client, worker, field, body):
    response = worker_client.post(HEARTBEAT, body, content_type="application/json")
    assert response.status_code == 400, response.content
    assert field in response.json()["fields"]
    assert presence.presence_get(worker.pk) is None


def test_heartbeat_at_the_bounds_is_accepted(worker_client, worker):
    response = worker_client.post(HEARTBEAT, f'{{"state": "busy", "task_id": {ID_MAX}, "progress": 5e-324}}',
                                  content_type="application/json")
    assert response.status_code == 200, response.content
    value = presence.presence_get(worker.pk)
    assert value["task_id"] == ID_MAX and value["progress"] == 5e-324
