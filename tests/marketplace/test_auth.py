"""Worker-token authentication: unknown/revoked -> 401 invalid_token, suspended -> 403 worker_suspended, and a
worker can only ever act as itself."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from marketplace import presence
from marketplace.selectors import worker_live_state
from marketplace.services import worker_reinstate, worker_revoke, worker_suspend
from tests.marketplace.factories import bearer

HEARTBEAT = "/api/v1/workers/heartbeat"
ME = "/api/v1/workers/me"


def _call(client, path):
    if path == HEARTBEAT:
        return client.post(path, {"state": "idle"}, format="json")
    return client.get(path)


@pytest.mark.parametrize("path", [HEARTBEAT, ME])
def test_missing_token_is_401(api_client, path):
    response = _call(api_client, path)
    assert response.status_code == 401
    assert response.json()["error"] == "not_authenticated"
    assert response["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("path", [HEARTBEAT, ME])
def test_unknown_token_is_401(api_client, worker, path):
    api_client.credentials(HTTP_AUTHORIZATION="Bearer wkr_nobody-has-this-token")
    response = _call(api_client, path)
    assert response.status_code == 401
    assert response.json() == {"error": "invalid_token", "detail": response.json()["detail"]}


def test_member_api_token_is_not_a_worker_token(api_client, member):
    from rest_framework.authtoken.models import Token

    key = Token.objects.create(user=member).key
    for header in (f"Token {key}", f"Bearer {key}"):
        api_client.credentials(HTTP_AUTHORIZATION=header)
        assert _call(api_client, HEARTBEAT).status_code == 401


@pytest.mark.parametrize("path", [HEARTBEAT, ME])
def test_revoked_token_is_401_at_once_even_with_a_warm_cache(worker_client, worker, member, path):
    assert _call(worker_client, path).status_code == 200  # warms the token cache
    worker_revoke(worker=worker, by=member)
    response = _call(worker_client, path)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"


@pytest.mark.parametrize("path", [HEARTBEAT, ME])
def test_suspended_is_403_then_reinstated_works(worker_client, worker, staff, path):
    assert _call(worker_client, path).status_code == 200
    worker_suspend(worker=worker, by=staff, reason="returns garbage")
    response = _call(worker_client, path)
    assert response.status_code == 403
    assert response.json()["error"] == "worker_suspended"
    worker_reinstate(worker=worker, by=staff)
    assert _call(worker_client, path).status_code == 200


def test_suspension_clears_presence(worker_client, worker, staff):
    worker_client.post(HEARTBEAT, {"state": "idle"}, format="json")
    worker.refresh_from_db()
    assert worker_live_state(worker) == "online"
    worker_suspend(worker=worker, by=staff, reason="maintenance")
    worker.refresh_from_db()
    assert worker_live_state(worker) == "suspended"
    assert presence.presence_get(worker.pk) is None


def test_one_worker_cannot_act_for_another(worker, other_worker):
    """Ids in the body are ignored: presence and identity come from the token only."""
    client = APIClient()
    client.credentials(**bearer(worker))
    body = {"state": "busy", "task_id": 7, "progress": 0.5, "worker_id": other_worker.pk, "id": other_worker.pk}
    assert client.post(HEARTBEAT, body, format="json").status_code == 200
    assert presence.presence_get(worker.pk)["state"] == "busy"
    assert presence.presence_get(other_worker.pk) is None
    me = client.get(ME, {"worker_id": other_worker.pk})
    assert me.json()["id"] == worker.pk

    # A worker token grants nothing on member endpoints: it cannot revoke or suspend anyone.
    for action in ("revoke", "suspend", "reinstate"):
        response = client.post(f"/api/v1/workers/{other_worker.pk}/{action}", {"reason": "x"}, format="json")
        assert response.status_code == 401, action
    other_worker.refresh_from_db()
    assert other_worker.status == "active"


def test_authentication_sets_owner_and_worker(worker, member):
    from rest_framework.test import APIRequestFactory

    from marketplace.auth import WorkerTokenAuthentication

    request = APIRequestFactory().get(ME, **bearer(worker))
    for _ in range(2):  # cold, then from the token cache
        user, auth = WorkerTokenAuthentication().authenticate(request)
        assert user.pk == member.pk and user.username == member.username and user.is_authenticated
        assert auth.pk == worker.pk and auth.owner_id == member.pk
        assert auth.ledger_label == f"worker:{worker.pk}"
        assert auth.max_vram_mb == 24576  # deferred field, loaded on access


def test_deactivated_owner_makes_token_invalid(worker_client, member):
    member.is_active = False
    member.save(update_fields=["is_active"])
    assert _call(worker_client, HEARTBEAT).status_code == 401
