"""The pool page, My workers, Add a worker, a worker's page and the public list API."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from ledger.selectors import ledger_verify
from marketplace import presence
from marketplace.models import EnrollmentToken, Worker
from marketplace.services import credit_grant, worker_revoke
from tests.factories import UserFactory
from tests.marketplace.factories import WorkerFactory, enroll_body


def _beat(worker, state="idle", progress=None):
    presence.presence_record(worker.pk, state=state, task_id=1 if state == "busy" else None, progress=progress)


@pytest.fixture
def pool(member, other_member):
    online = WorkerFactory(owner=member, name="two-gpus", benchmark_tflops=10.0,
                           gpus=[{"name": "RTX 4090", "memory_mb": 24564}, {"name": "RTX 4090", "memory_mb": 24564}])
    busy = WorkerFactory(owner=other_member, name="one-gpu", benchmark_tflops=5.5,
                         gpus=[{"name": "RTX 3060", "memory_mb": 12288}])
    WorkerFactory(owner=other_member, name="sleeping", benchmark_tflops=100.0)  # offline: not counted
    revoked = WorkerFactory(owner=member, name="gone")
    _beat(online)
    _beat(busy, "busy", 0.5)
    worker_revoke(worker=revoked, by=member)
    credit_grant(worker=online, amount=Decimal("3"), reason="r", reference="task:1")
    credit_grant(worker=busy, amount=Decimal("7.5"), reason="r", reference="task:2")
    return {"online": online, "busy": busy}


def _stat(html: str, stat_id: str) -> str:
    return re.search(rf'id="{stat_id}"><strong>([^<]+)</strong>', html).group(1)


def test_pool_page_totals_and_leaderboard(client, pool, member, other_member):
    html = client.get("/workers/").content.decode()
    assert _stat(html, "stat-online") == "2"
    assert _stat(html, "stat-gpus") == "3"
    assert _stat(html, "stat-vram") == "61,416"
    assert _stat(html, "stat-tflops") == "15.5"
    assert "two-gpus" in html and "one-gpu" in html and "sleeping" in html
    assert "gone" not in html  # revoked workers leave the public pool
    assert 'badge badge-busy' in html and 'badge badge-offline' in html
    board = html.split("<h2>Contributors</h2>")[1]
    assert board.index(other_member.username) < board.index(member.username)
    assert "7.5" in board
    assert member.email not in html


def test_pool_page_empty_state(client, db):
    html = client.get("/workers/").content.decode()
    assert "No workers yet" in html and "No credits granted yet" in html


def test_pool_page_query_count_does_not_grow_with_rows(client, db):
    def count() -> int:
        with CaptureQueriesContext(connection) as ctx:
            assert client.get("/workers/").status_code == 200
        return len(ctx)

    for w in WorkerFactory.create_batch(2):
        _beat(w)
    few = count()
    for w in WorkerFactory.create_batch(10):
        _beat(w)
    assert count() == few


def test_my_workers_needs_login(client, db):
    response = client.get("/workers/mine/")
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


def test_my_workers_shows_own_workers_with_state(client, pool, member):
    client.force_login(member)
    html = client.get("/workers/mine/").content.decode()
    assert "two-gpus" in html and "gone" in html and "one-gpu" not in html
    assert 'badge badge-online' in html and 'badge badge-revoked' in html
    assert 'hx-trigger="every 5s"' in html
    assert html.count("Revoke</button>") == 1  # not for the revoked one
    fragment = client.get("/workers/mine/", HTTP_HX_REQUEST="true").content.decode()
    assert fragment.lstrip().startswith('<div id="my-workers"') and "<html" not in fragment
    assert "two-gpus" in fragment


def test_my_workers_query_count_does_not_grow_with_rows(client, member):
    client.force_login(member)

    def count() -> int:
        with CaptureQueriesContext(connection) as ctx:
            assert client.get("/workers/mine/").status_code == 200
        return len(ctx)

    WorkerFactory.create_batch(2, owner=member)
    few = count()
    WorkerFactory.create_batch(8, owner=member)
    assert count() == few


def test_add_worker_shows_token_once_and_it_enrolls(client, member, settings):
    settings.AGORA_PUBLIC_URL = "https://agora.example.org"
    client.force_login(member)
    assert "Create enrollment token" in client.get("/workers/add/").content.decode()
    html = client.post("/workers/add/", {"name": "attic-box"}).content.decode()

    token = re.search(r"--token (\S+)", html).group(1)
    # No checkout needed: the agent's wheel comes from this server.
    assert re.search(r"pip install https://agora\.example\.org/agent/agora_worker-[0-9.]+-py3-none-any\.whl", html)
    assert f"agora-worker enroll --server https://agora.example.org --token {token} --name attic-box" in html
    assert "agora-worker run" in html and "--allow-cpu" in html
    assert token not in str(EnrollmentToken.objects.values().get())
    # Not shown again.
    assert token not in client.get("/workers/add/").content.decode()
    assert token not in client.get("/workers/mine/").content.decode()

    response = client.post("/api/v1/workers/enroll", enroll_body(token), content_type="application/json")
    assert response.status_code == 201
    assert Worker.objects.get().owner == member


def test_add_worker_uses_request_host_when_public_url_is_the_local_default(client, member, settings):
    settings.AGORA_PUBLIC_URL = "http://127.0.0.1:8000"
    settings.ALLOWED_HOSTS = ["agora.lan"]
    client.force_login(member)
    html = client.post("/workers/add/", {"name": ""}, HTTP_HOST="agora.lan:8000").content.decode()
    assert "--server http://agora.lan:8000 " in html


def test_add_worker_rejects_bad_names(client, member):
    client.force_login(member)
    html = client.post("/workers/add/", {"name": "rm -rf /"}).content.decode()
    assert "letters, digits" in html
    assert not EnrollmentToken.objects.exists()


def test_worker_page(client, pool, staff, member):
    worker = pool["online"]
    html = client.get(f"/workers/{worker.pk}/").content.decode()
    assert worker.name in html and "RTX 4090" in html and "worker.enrolled" not in html  # factory, no entry
    assert "task:1" in html and "Suspend worker" not in html and "Revoke this worker" not in html
    client.force_login(staff)
    assert "Suspend worker" in client.get(f"/workers/{worker.pk}/").content.decode()
    client.force_login(member)
    assert "Revoke this worker" in client.get(f"/workers/{worker.pk}/").content.decode()
    assert client.get("/workers/999999/").status_code == 404


def test_public_list_api(api_client, pool, member):
    response = api_client.get("/api/v1/workers/", {"limit": 2})
    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 3 and len(body["results"]) == 2 and body["next"]
    everything = api_client.get("/api/v1/workers/").json()["results"]
    by_name = {w["name"]: w for w in everything}
    assert by_name["two-gpus"]["live_state"] == "online"
    assert by_name["one-gpu"]["live_state"] == "busy"
    assert by_name["sleeping"]["live_state"] == "offline"
    assert by_name["two-gpus"]["owner"] == member.username
    assert by_name["two-gpus"]["credits"] == "3.0000"
    assert by_name["two-gpus"]["max_vram_mb"] == 24564
    text = str(everything)
    assert "token" not in text and member.email not in text and "@" not in text


def test_public_list_query_count_constant(api_client, db):
    def count() -> int:
        with CaptureQueriesContext(connection) as ctx:
            api_client.get("/api/v1/workers/")
        return len(ctx)

    WorkerFactory.create_batch(2)
    few = count()
    WorkerFactory.create_batch(10)
    assert count() == few


def test_home_and_profile_show_compute(client, pool, member):
    html = client.get("/").content.decode()
    assert re.search(r"<strong>2</strong>workers online", html)
    client.force_login(member)
    profile = client.get("/accounts/profile/").content.decode()
    assert re.search(r"<strong>3\.00</strong>compute credits", profile)
    assert re.search(r"<strong>2</strong>workers", profile)


def test_ledger_chain_after_a_workers_life(client, member):
    staff = UserFactory(is_staff=True)
    client.force_login(member)
    html = client.post("/workers/add/", {"name": "box"}).content.decode()
    token = re.search(r"--token (\S+)", html).group(1)
    worker_id = client.post("/api/v1/workers/enroll", enroll_body(token),
                            content_type="application/json").json()["worker_id"]
    client.force_login(staff)
    client.post(f"/workers/{worker_id}/suspend", {"reason": "checking"})
    client.post(f"/workers/{worker_id}/reinstate")
    client.force_login(member)
    client.post(f"/workers/{worker_id}/revoke")
    from ledger.models import Entry

    actions = list(Entry.objects.filter(subject=f"worker:{worker_id}").order_by("seq").values_list("action", flat=True))
    assert actions == ["worker.enrolled", "worker.suspended", "worker.reinstated", "worker.revoked"]
    assert ledger_verify().ok
