"""The site as a whole: every area reachable from the navigation, API schema and offline docs, health."""

import pytest

pytestmark = pytest.mark.django_db

AREAS = ["/", "/proposals/", "/guardrails/", "/runs/", "/models/", "/playground/", "/workers/", "/ledger/",
         "/accounts/login/", "/accounts/signup/"]


@pytest.mark.parametrize("path", AREAS)
def test_every_area_renders_for_anonymous_visitors(client, path):
    response = client.get(path)
    assert response.status_code == 200, path
    assert b"Agora" in response.content


def test_navigation_links_to_every_area(client):
    html = client.get("/").content.decode()
    for path in AREAS[1:8]:
        assert f'href="{path}"' in html, path


def test_openapi_schema_and_offline_docs(client):
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    for expected in ("/api/v1/auth/token", "/api/v1/proposals/", "/api/v1/ledger/", "/api/v1/workers/enroll",
                     "/api/v1/tasks/claim", "/api/v1/runs/"):
        assert expected in paths, expected
    docs = client.get("/api/docs/")
    assert docs.status_code == 200
    html = docs.content.decode()
    assert "cdn" not in html.lower() and "unpkg" not in html.lower()
    assert "/static/drf_spectacular_sidecar/" in html


def test_health_and_ping(client):
    assert client.get("/healthz").json() == {"ok": True}
    assert client.get("/ping").status_code == 200


def test_vendored_assets_are_served_locally(client):
    html = client.get("/").content.decode()
    assert "/static/vendor/htmx.min.js" in html and "/static/vendor/pico.min.css" in html
    assert "http://" not in html.split("<body")[0] and "https://" not in html.split("<body")[0]
