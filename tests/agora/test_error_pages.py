"""Error answers people and programs can use: finished pages for browsers, the API's JSON shape under /api/."""

import re

import pytest

pytestmark = pytest.mark.django_db


def test_unknown_page_is_a_finished_404_page(client):
    response = client.get("/proposals/999999/")
    assert response.status_code == 404
    html = response.content.decode()
    assert "Nothing here" in html and "/proposals/999999/" in html and 'href="/ledger/"' in html
    for link in ("/proposals/", "/runs/", "/workers/", "/ledger/", "/"):
        assert client.get(link).status_code == 200, link


def test_unknown_api_path_answers_json_not_html(client):
    response = client.get("/api/v1/no-such-thing")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("application/json")
    assert response.json()["error"] == "not_found"


def test_unexpected_api_failure_answers_json_500(client, monkeypatch):
    from ledger import api

    def broken(*args, **kwargs):
        raise RuntimeError("database on fire")

    monkeypatch.setattr(api, "ledger_head", broken)
    client.raise_request_exception = False
    response = client.get("/api/v1/ledger/head")
    assert response.status_code == 500
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["error"] == "server_error" and "database on fire" not in body["detail"]


def test_unexpected_page_failure_is_a_finished_500_page(client, monkeypatch):
    from agora import views

    def broken(*args, **kwargs):
        raise RuntimeError("template engine on fire")

    monkeypatch.setattr(views, "home_context", broken)
    client.raise_request_exception = False
    response = client.get("/")
    assert response.status_code == 500
    html = response.content.decode()
    assert "Something went wrong" in html and "on fire" not in html


@pytest.mark.parametrize("path", ["/admin/training/round/add/", "/admin/training/task/add/",
                                  "/admin/ledger/entry/add/", "/admin/marketplace/creditgrant/add/",
                                  "/admin/training/trainingrun/add/", "/admin/marketplace/worker/add/"])
def test_admin_never_creates_records_by_hand(client, staff, path):
    staff.is_superuser = True
    staff.save()
    client.force_login(staff)
    assert client.get(path).status_code == 403


def test_admin_is_branded(client, staff):
    staff.is_superuser = True
    staff.save()
    client.force_login(staff)
    html = client.get("/admin/").content.decode()
    assert "Agora administration" in html
    # Members' accounts may be added by hand, and a voter approval (its form calls the service, which writes the
    # ledger); the community's records never are.
    adds = re.findall(r"/admin/(?:training|ledger|marketplace|governance)/\w+/add/", html)
    assert adds == ["/admin/governance/voterapproval/add/"]
