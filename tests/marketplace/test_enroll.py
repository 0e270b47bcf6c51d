"""POST /api/v1/workers/enroll: single-use, expiring enrollment tokens; every bad input is a 400 naming the field."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import time_machine
from django.db import connections
from django.utils import timezone

from ledger.models import Entry
from ledger.selectors import ledger_verify
from marketplace.errors import EnrollmentTokenUsed
from marketplace.models import EnrollmentToken, Worker
from marketplace.presence import token_hash
from marketplace.services import enrollment_token_create, worker_enroll
from tests.marketplace.factories import enroll_body

URL = "/api/v1/workers/enroll"


@pytest.fixture
def token(member):
    return enrollment_token_create(owner=member, name="basement-3090").token


def test_enroll_creates_worker_and_returns_token_once(api_client, member, token):
    response = api_client.post(URL, enroll_body(token), format="json")

    assert response.status_code == 201, response.json()
    body = response.json()
    assert set(body) == {"worker_id", "worker_token"}
    worker = Worker.objects.get(pk=body["worker_id"])
    assert worker.owner == member
    assert worker.name == "basement-3090"
    assert worker.gpus == [{"name": "NVIDIA GeForce RTX 3090", "memory_mb": 24576}]
    assert (worker.cpu_count, worker.memory_mb, worker.torch_version, worker.cuda_version) == (16, 65536, "2.13.0", "12.4")
    assert (worker.benchmark_tflops, worker.benchmark_mem_gbps, worker.agent_version) == (35.5, 900.0, "0.1.0")
    assert worker.status == Worker.Status.ACTIVE and worker.reliability == 0.5
    assert worker.max_vram_mb == 24576
    # Stored hashed, never in plain text.
    assert worker.token_hash == token_hash(body["worker_token"])
    assert len(body["worker_token"]) >= 40
    assert body["worker_token"] not in str(Worker.objects.filter(pk=worker.pk).values().get())
    enrollment = EnrollmentToken.objects.get()
    assert enrollment.used_at is not None and enrollment.worker == worker
    assert enrollment.token_hash == token_hash(token)

    entry = Entry.objects.get(action="worker.enrolled")
    assert entry.subject == f"worker:{worker.pk}" and entry.actor == member.username
    assert entry.payload["hardware"]["gpus"][0]["memory_mb"] == 24576
    assert token not in str(entry.payload) and body["worker_token"] not in str(entry.payload)
    assert ledger_verify().ok

    # The token it got works for the protocol.
    me = api_client.get("/api/v1/workers/me", HTTP_AUTHORIZATION=f"Bearer {body['worker_token']}")
    assert me.status_code == 200 and me.json()["id"] == worker.pk


def test_cpu_worker_without_cuda(api_client, token):
    body = enroll_body(token)
    body["hardware"].update(gpus=[], cuda=None)
    response = api_client.post(URL, body, format="json")
    assert response.status_code == 201, response.json()
    worker = Worker.objects.get()
    assert worker.gpus == [] and worker.cuda_version == "" and worker.max_vram_mb == 0


def _drop(path):
    def mutate(body):
        *parents, last = path.split(".")
        target = body
        for p in parents:
            target = target[p]
        del target[last]
    return mutate


def _set(path, value):
    def mutate(body):
        *parents, last = path.split(".")
        target = body
        for p in parents:
            target = target[int(p)] if isinstance(target, list) else target[p]
        target[last] = value
    return mutate


BAD = [
    ("enrollment_token", _drop("enrollment_token")),
    ("name", _drop("name")),
    ("name", _set("name", "")),
    ("name", _set("name", "x" * 101)),
    ("hardware", _drop("hardware")),
    ("hardware", _set("hardware", "a 3090")),
    ("hardware.gpus", _drop("hardware.gpus")),
    ("hardware.gpus", _set("hardware.gpus", "RTX 3090")),
    ("hardware.gpus", _set("hardware.gpus", [{"name": "RTX", "memory_mb": -1}])),
    ("hardware.gpus", _set("hardware.gpus", [{"memory_mb": 1024}])),
    ("hardware.gpus", _set("hardware.gpus", [{"name": "RTX", "memory_mb": "lots"}])),
    ("hardware.cpu_count", _set("hardware.cpu_count", 0)),
    ("hardware.cpu_count", _drop("hardware.cpu_count")),
    ("hardware.memory_mb", _set("hardware.memory_mb", -5)),
    ("hardware.torch", _drop("hardware.torch")),
    ("benchmark", _drop("benchmark")),
    ("benchmark.tflops", _set("benchmark.tflops", -1)),
    ("benchmark.tflops", _set("benchmark.tflops", "NaN")),
    ("benchmark.tflops", _set("benchmark.tflops", "Infinity")),
    ("benchmark.tflops", _set("benchmark.tflops", True)),
    ("benchmark.mem_gbps", _drop("benchmark.mem_gbps")),
    ("benchmark.mem_gbps", _set("benchmark.mem_gbps", "-inf")),
    ("agent_version", _drop("agent_version")),
]


@pytest.mark.parametrize(("field", "mutate"), BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_bad_input_names_the_field_and_stores_nothing(api_client, token, field, mutate):
    body = enroll_body(token)
    mutate(body)
    response = api_client.post(URL, body, format="json")

    assert response.status_code == 400, response.json()
    error = response.json()
    assert error["error"] == "invalid"
    assert error["detail"].startswith(field), error
    assert any(name.startswith(field) for name in error["fields"])
    assert not Worker.objects.exists()
    assert EnrollmentToken.objects.get().used_at is None
    assert not Entry.objects.exists()


def test_json_nan_literal_is_rejected(api_client, token):
    raw = '{"benchmark": {"tflops": NaN, "mem_gbps": 1}}'
    response = api_client.post(URL, raw, content_type="application/json")
    assert response.status_code == 400
    assert not Worker.objects.exists()


def test_unknown_token_is_401(api_client, token):
    response = api_client.post(URL, enroll_body("enr_not-a-real-token"), format="json")
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_enrollment_token"
    assert not Worker.objects.exists()


def test_token_works_once(api_client, token):
    assert api_client.post(URL, enroll_body(token), format="json").status_code == 201
    again = api_client.post(URL, enroll_body(token, name="second"), format="json")
    assert again.status_code == 403
    assert again.json()["error"] == "enrollment_token_used"
    assert Worker.objects.count() == 1


def test_expired_token_is_refused(api_client, member, settings):
    settings.AGORA_ENROLLMENT_TOKEN_TTL = timedelta(hours=1)
    token = enrollment_token_create(owner=member).token
    with time_machine.travel(timezone.now() + timedelta(hours=1, seconds=1)):
        response = api_client.post(URL, enroll_body(token), format="json")
    assert response.status_code == 403
    assert response.json()["error"] == "enrollment_token_expired"
    assert not Worker.objects.exists()
    assert EnrollmentToken.objects.get().used_at is None


def test_token_of_deactivated_member_is_refused(api_client, member, token):
    member.is_active = False
    member.save(update_fields=["is_active"])
    response = api_client.post(URL, enroll_body(token), format="json")
    assert response.status_code == 401


def test_enrollment_tokens_are_stored_hashed(member):
    created = enrollment_token_create(owner=member)
    row = EnrollmentToken.objects.filter(pk=created.record.pk).values().get()
    assert created.token not in str(row)
    assert row["token_hash"] == token_hash(created.token)
    assert row["expires_at"] > row["created_at"]


@pytest.mark.django_db(transaction=True)
def test_token_single_use_under_concurrency(member):
    """Eight threads race with one token (real connections, real row locks on PostgreSQL)."""
    token = enrollment_token_create(owner=member).token
    body = enroll_body(token)
    barrier = threading.Barrier(8)
    outcomes: list[object] = []

    def attempt(n: int):
        try:
            barrier.wait()
            created = worker_enroll(enrollment_token=token, name=f"racer-{n}", hardware=body["hardware"],
                                    benchmark=body["benchmark"], agent_version="0.1.0")
            outcomes.append(created.record.pk)
        except Exception as exc:  # noqa: BLE001
            outcomes.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    winners = [o for o in outcomes if isinstance(o, int)]
    losers = [o for o in outcomes if not isinstance(o, int)]
    assert len(winners) == 1, outcomes
    assert all(isinstance(o, EnrollmentTokenUsed) for o in losers), losers
    assert Worker.objects.count() == 1
    assert Entry.objects.filter(action="worker.enrolled").count() == 1
    assert ledger_verify().ok
