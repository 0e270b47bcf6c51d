"""Who may suspend, reinstate and revoke a worker, in every state: API, pages and the Django admin."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from ledger.models import Entry
from ledger.selectors import ledger_verify
from marketplace.models import Worker
from marketplace.services import worker_revoke, worker_suspend
from tests.factories import UserFactory
from tests.marketplace.factories import WorkerFactory

ROLES = ["anonymous", "member", "owner", "staff"]
STATES = ["active", "suspended", "revoked"]
# (action, role, state) -> expected status; anything not listed for owner/staff is forbidden or a conflict.
ALLOWED = {
    ("revoke", "owner", "active"): 200,
    ("revoke", "owner", "suspended"): 200,
    ("revoke", "owner", "revoked"): 409,
    ("suspend", "staff", "active"): 200,
    ("suspend", "staff", "suspended"): 409,
    ("suspend", "staff", "revoked"): 409,
    ("reinstate", "staff", "suspended"): 200,
    ("reinstate", "staff", "active"): 409,
    ("reinstate", "staff", "revoked"): 409,
}
AFTER = {"revoke": "revoked", "suspend": "suspended", "reinstate": "active"}


def expected(action, role, state):
    if role == "anonymous":
        return 401
    return ALLOWED.get((action, role, state), 403)


def _worker_in(state, owner, staff):
    worker = WorkerFactory(owner=owner)
    if state == "suspended":
        worker_suspend(worker=worker, by=staff, reason="setup")
    elif state == "revoked":
        worker_revoke(worker=worker, by=owner)
    return Worker.objects.get(pk=worker.pk)


@pytest.mark.parametrize("action", ["suspend", "reinstate", "revoke"])
@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("role", ROLES)
def test_api_matrix(role, state, action, member, other_member, staff):
    worker = _worker_in(state, member, staff)
    client = APIClient()
    if role != "anonymous":
        client.force_authenticate({"member": other_member, "owner": member, "staff": staff}[role])
    entries_before = Entry.objects.count()

    response = client.post(f"/api/v1/workers/{worker.pk}/{action}", {"reason": "misbehaving"}, format="json")

    want = expected(action, role, state)
    assert response.status_code == want, response.json()
    worker.refresh_from_db()
    if want == 200:
        assert worker.status == AFTER[action]
        assert response.json()["status"] == AFTER[action]
        entry = Entry.objects.order_by("-seq").first()
        assert entry.action == f"worker.{AFTER[action] if action != 'reinstate' else 'reinstated'}"
        assert entry.subject == f"worker:{worker.pk}"
        assert Entry.objects.count() == entries_before + 1
    else:
        assert worker.status == state
        assert Entry.objects.count() == entries_before
        assert "error" in response.json()
    assert ledger_verify().ok


def test_suspend_needs_a_reason(staff_client, worker):
    response = staff_client.post(f"/api/v1/workers/{worker.pk}/suspend", {"reason": ""}, format="json")
    assert response.status_code == 400 and response.json()["detail"].startswith("reason")
    worker.refresh_from_db()
    assert worker.status == "active"


def test_unknown_worker_is_404(staff_client):
    assert staff_client.post("/api/v1/workers/999999/suspend", {"reason": "x"}, format="json").status_code == 404


def test_suspension_reason_in_ledger(staff_client, worker, staff):
    staff_client.post(f"/api/v1/workers/{worker.pk}/suspend", {"reason": "uploads NaNs"}, format="json")
    entry = Entry.objects.get(action="worker.suspended")
    assert entry.actor == staff.username and entry.payload["reason"] == "uploads NaNs"


# --- the same rules through the pages --------------------------------------------------------------

@pytest.mark.parametrize(("role", "action", "allowed"), [
    ("owner", "revoke", True), ("member", "revoke", False), ("staff", "revoke", False),
    ("staff", "suspend", True), ("owner", "suspend", False), ("member", "suspend", False),
])
def test_page_actions(client, role, action, allowed, member, other_member, staff):
    worker = WorkerFactory(owner=member)
    client.force_login({"member": other_member, "owner": member, "staff": staff}[role])
    response = client.post(f"/workers/{worker.pk}/{action}", {"reason": "flaky"})
    assert response.status_code == 302
    worker.refresh_from_db()
    assert (worker.status == AFTER[action]) is allowed


def test_page_reinstate_and_anonymous_redirected_to_login(client, worker, staff):
    worker_suspend(worker=worker, by=staff, reason="x")
    response = client.post(f"/workers/{worker.pk}/reinstate")
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]
    client.force_login(staff)
    client.post(f"/workers/{worker.pk}/reinstate")
    worker.refresh_from_db()
    assert worker.status == "active"


def test_revoke_next_cannot_redirect_off_site(client, worker, member):
    client.force_login(member)
    response = client.post(f"/workers/{worker.pk}/revoke", {"next": "https://evil.example/"})
    assert response["Location"] == f"/workers/{worker.pk}/"


# --- Django admin actions call the services --------------------------------------------------------

def test_admin_suspend_and_reinstate_actions(client, worker):
    admin = UserFactory(is_staff=True, is_superuser=True)
    client.force_login(admin)
    url = "/admin/marketplace/worker/"
    page = client.post(url, {"action": "suspend_workers", "_selected_action": [worker.pk]})
    assert page.status_code == 200 and b"reason" in page.content
    worker.refresh_from_db()
    assert worker.status == "active"

    client.post(url, {"action": "suspend_workers", "_selected_action": [worker.pk], "apply": "1",
                      "reason": "cryptominer"})
    worker.refresh_from_db()
    assert worker.status == "suspended" and worker.status_reason == "cryptominer"
    assert Entry.objects.filter(action="worker.suspended", actor=admin.username).exists()

    client.post(url, {"action": "reinstate_workers", "_selected_action": [worker.pk]})
    worker.refresh_from_db()
    assert worker.status == "active"
    assert Entry.objects.filter(action="worker.reinstated").exists()
    assert client.get(f"{url}{worker.pk}/change/").status_code == 200
    assert client.get("/admin/marketplace/creditgrant/").status_code == 200
