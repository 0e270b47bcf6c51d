"""Malformed requests get a 4xx that names the field or parameter (and the limit), never a 500, and change
nothing: deep JSON nesting, non-finite numbers, NUL characters, out-of-range integers, hostile update
metadata."""

from __future__ import annotations

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from governance.models import Proposal
from ledger.models import Entry
from tests.marketplace.factories import WorkerFactory, bearer
from tests.training.conftest import checkpoint_storage, enqueued, stored_files  # noqa: F401  (fixtures)
from tests.training.factories import approved_proposal, metrics_json, train_update
from training import services
from training.models import Task

pytestmark = pytest.mark.django_db

DEEP = "[" * 100_000 + "]" * 100_000  # RecursionError in json.loads before
BIG = "9" * 30  # beyond a bigint


def _error(response, status: int, field: str, *, in_fields: bool = True) -> dict:
    assert response.status_code == status, (response.status_code, response.content[:300])
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) <= {"error", "detail", "fields"} and body["error"] and body["detail"]
    assert field in body["detail"], body
    if status == 400 and in_fields:
        assert any(key == field or key.startswith((f"{field}.", f"{field}[")) for key in body.get("fields", {})), body
    return body


@pytest.fixture
def worker(member):
    return WorkerFactory(owner=member, gpus=[], cuda_version="")


@pytest.fixture
def worker_client(worker):
    client = APIClient()
    client.credentials(**bearer(worker))
    return client


@pytest.fixture
def token_client(member):
    from rest_framework.authtoken.models import Token

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=member).key}")
    return client


def _post_json(client, path: str, text: str):
    return client.post(path, data=text, content_type="application/json")


# --- JSON bodies -------------------------------------------------------------------------------------------


def test_deep_json_is_400_naming_the_limit_on_every_kind_of_json_endpoint(token_client, worker_client):
    for client, path in [
        (APIClient(), "/api/v1/auth/token"),
        (APIClient(), "/api/v1/workers/enroll"),
        (token_client, "/api/v1/proposals/"),
        (worker_client, "/api/v1/workers/heartbeat"),
        (worker_client, "/api/v1/tasks/1/fail"),
    ]:
        body = _error(_post_json(client, path, DEEP), 400, "body")
        assert "nested deeper than 32 levels" in body["detail"], path


def test_nesting_beyond_the_limit_names_the_field_and_stores_nothing(token_client):
    spec = "[" * 40 + "]" * 40
    response = _post_json(token_client, "/api/v1/proposals/",
                          '{"kind": "training", "title": "t", "body": "b", "spec": ' + spec + "}")
    body = _error(response, 400, "spec")
    assert "32 levels" in body["detail"]
    assert not Proposal.objects.exists() and not Entry.objects.exists()


def test_nesting_limit_follows_the_setting(settings, token_client):
    settings.AGORA_JSON_MAX_DEPTH = 3
    body = _error(_post_json(token_client, "/api/v1/proposals/", '{"spec": {"a": {"b": {}}}}'), 400, "spec")
    assert "3 levels" in body["detail"]


def test_bodies_beyond_the_size_limit_are_413_before_they_are_read(settings, token_client):
    big = '{"kind": "training", "title": "' + "x" * (1024 * 1024) + '", "spec": {}}'
    body = _error(_post_json(token_client, "/api/v1/proposals/", big), 413, "body")
    assert body["error"] == "too_large" and str(1024 * 1024) in body["detail"]
    form = token_client.post("/api/v1/proposals/", "kind=training&title=" + "x" * (1024 * 1024),
                             content_type="application/x-www-form-urlencoded")
    _error(form, 413, "body")
    multipart = token_client.post("/api/v1/proposals/", {"kind": "training", "title": "x" * (1024 * 1024)},
                                  format="multipart")
    _error(multipart, 413, "body")
    settings.AGORA_MAX_BODY_BYTES = 100
    _error(_post_json(APIClient(), "/api/v1/auth/token", '{"username": "' + "u" * 100 + '"}'), 413, "body")
    assert not Proposal.objects.exists()


def test_a_body_without_a_declared_length_is_cut_at_the_limit(settings):
    from io import BytesIO

    from agora.api import RequestTooLarge
    from agora.parsers import FormParser, JSONParser

    settings.AGORA_MAX_BODY_BYTES = 10
    assert JSONParser().parse(BytesIO(b'{"a": 1}'), parser_context={}) == {"a": 1}
    assert FormParser().parse(BytesIO(b"a=1"), parser_context={})["a"] == "1"
    with pytest.raises(RequestTooLarge):
        JSONParser().parse(BytesIO(b'{"a": "' + b"x" * 100 + b'"}'), parser_context={})
    with pytest.raises(RequestTooLarge):
        FormParser().parse(BytesIO(b"a=" + b"x" * 100), parser_context={})


@pytest.mark.parametrize("number", ["1e400", "-1e999", "NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused_by_field(worker_client, number):
    response = _post_json(worker_client, "/api/v1/workers/heartbeat", '{"state": "idle", "progress": ' + number + "}")
    body = _error(response, 400, "progress")
    assert "finite" in body["detail"]


@pytest.mark.parametrize("text", ['"a\\u0000b"', '"\\ud800"'])
def test_nul_and_lone_surrogates_in_json_strings_are_refused_by_field(token_client, text):
    response = _post_json(token_client, "/api/v1/proposals/",
                          '{"kind": "training", "title": ' + text + ', "body": "b", "spec": {}}')
    _error(response, 400, "title")
    assert not Proposal.objects.exists()


def test_nul_in_a_nested_key_is_refused_by_path(token_client):
    response = _post_json(token_client, "/api/v1/proposals/", '{"spec": {"model": {"a\\u0000": 1}}}')
    _error(response, 400, "spec.model")


# --- paths and query strings -------------------------------------------------------------------------------


@pytest.mark.parametrize("url, name", [
    ("/api/v1/checkpoints/%00", "path"),
    ("/api/v1/checkpoints/ab%00cd", "path"),
    ("/api/v1/proposals/?q=a%00b", "q"),
    ("/api/v1/proposals/?status=%00", "status"),
    ("/api/v1/runs/?status=%00", "status"),
    ("/api/v1/ledger/?after=%00", "after"),
    ("/api/v1/ledger/?subject=%00", "subject"),
    ("/api/v1/workers/?limit=1&offset=%00", "offset"),
    ("/api/v1/guardrails/?kind=data_filter&x%00=1", "query string"),
])
def test_nul_in_path_or_query_is_400_naming_it(client, url, name):
    _error(client.get(url), 400, name)


@pytest.mark.parametrize("header, value, name", [
    ("HTTP_AUTHORIZATION", "Token abc\x00def", "Authorization header"),
    ("HTTP_AUTHORIZATION", "Bearer abc\x00def", "Authorization header"),
    ("HTTP_COOKIE", "sessionid=abcdefghij\x00klm", "Cookie header"),
])
def test_nul_in_credentials_is_400_not_a_failed_lookup(client, header, value, name):
    _error(client.get("/api/v1/ledger/head", **{header: value}), 400, name)
    page = client.get("/", **{header: value})
    assert page.status_code == 400 and name.encode() in page.content


def test_too_many_query_parameters_is_400_in_the_error_shape(client):
    body = _error(client.get("/api/v1/runs/?" + "&".join(f"p{i}=1" for i in range(1500))), 400, "query string")
    assert "1000 parameters" in body["detail"]


def test_nul_in_a_page_query_is_a_plain_400(client):
    response = client.get("/proposals/?q=a%00b")
    assert response.status_code == 400 and b"q: NUL" in response.content


def test_nul_in_a_write_is_refused_before_the_view(token_client):
    body = {"kind": "training", "title": "t", "body": "b", "spec": {}}
    _error(token_client.post("/api/v1/proposals/?open=%00", body, format="json"), 400, "open")
    assert not Proposal.objects.exists()


@pytest.mark.parametrize("url, name", [
    ("/api/v1/runs/?limit=" + BIG, "limit"),
    ("/api/v1/runs/?offset=" + BIG, "offset"),
    ("/api/v1/workers/?offset=-1", "offset"),
    ("/api/v1/workers/?limit=0", "limit"),
    ("/api/v1/workers/?limit=abc", "limit"),
    ("/api/v1/workers/?limit=1_0", "limit"),
    ("/api/v1/proposals/?limit=101", "limit"),
    ("/api/v1/proposals/?offset=1000001", "offset"),
    ("/api/v1/ledger/?after=" + BIG, "after"),
    ("/api/v1/ledger/?limit=" + BIG, "limit"),
    ("/api/v1/ledger/?after=-1", "after"),
])
def test_integer_query_parameters_are_range_checked(client, url, name):
    body = _error(client.get(url), 400, name)
    assert body["error"] == "invalid"


def test_limits_within_range_page_through_a_list(client, member):
    for _ in range(3):
        WorkerFactory(owner=member)
    first = client.get("/api/v1/workers/?limit=2").json()
    assert first["count"] == 3 and len(first["results"]) == 2 and first["next"]
    second = client.get("/api/v1/workers/?limit=2&offset=2").json()
    assert len(second["results"]) == 1 and second["next"] is None
    assert client.get("/api/v1/workers/?offset=1000000").json()["results"] == []


@pytest.mark.parametrize("method, url, name", [
    ("get", f"/api/v1/runs/{BIG}/", "pk"),
    ("get", f"/api/v1/proposals/{BIG}/", "pk"),
    ("get", f"/api/v1/workers/{BIG}/", "worker_id"),
    ("post", f"/api/v1/proposals/{BIG}/vote", "pk"),
    ("post", f"/api/v1/tasks/{BIG}/fail", "task_id"),
])
def test_ids_beyond_a_bigint_are_404_naming_the_parameter(token_client, worker_client, method, url, name):
    client = worker_client if "/tasks/" in url else token_client
    body = _error(getattr(client, method)(url, {}, format="json"), 404, name)
    assert body["error"] == "not_found"


def test_unknown_api_paths_answer_in_the_error_shape(client):
    response = client.get("/api/v1/no-such-thing")
    assert response.status_code == 404 and response.json()["error"] == "not_found"
    assert client.get("/no-such-page").status_code == 404  # pages keep their HTML 404
    drf = client.get("/api/v1/runs/12345/")  # a view's own 404 keeps its message
    assert drf.status_code == 404 and drf.json()["detail"] != "No such API endpoint."
    assert client.get("/api/v1/ledger/head", HTTP_ACCEPT="application/xml").status_code == 406


# --- uploads -----------------------------------------------------------------------------------------------


@pytest.fixture
def claimed(worker, worker_client):
    services.run_start(proposal_id=approved_proposal().pk)
    body = worker_client.post("/api/v1/tasks/claim").json()
    return Task.objects.get(pk=body["id"]), body


def _upload(client, task_id: int, data: bytes, metrics: str):
    return client.post(f"/api/v1/tasks/{task_id}/result",
                       {"update": SimpleUploadedFile("u.safetensors", data), "metrics": metrics}, format="multipart")


def _with_chunk(data: bytes, chunk) -> bytes:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    inner = json.loads(header["__metadata__"]["agora_update"])
    inner["chunk"] = chunk
    header["__metadata__"]["agora_update"] = json.dumps(inner)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[8 + n :]


def test_deep_metrics_are_400_naming_metrics_and_nothing_is_stored(claimed, worker_client, checkpoint_storage):  # noqa: F811
    task, body = claimed
    data, metrics = train_update(body)
    before = stored_files(checkpoint_storage)
    for bad in ("[" * 100_000, '{"loss_end": ' + "[" * 40 + "]" * 40 + "}"):
        response = _upload(worker_client, task.pk, data, bad)
        _error(response, 400, "metrics")
        assert "nested deeper than 32 levels" in json.dumps(response.json())
    task.refresh_from_db()
    assert task.status != Task.Status.COMPLETED and stored_files(checkpoint_storage) == before


@pytest.mark.parametrize("chunk", [2**26, 2**40, 3])
def test_int8_chunk_outside_the_allowed_sizes_is_400(claimed, worker_client, checkpoint_storage, chunk):  # noqa: F811
    task, body = claimed
    data, metrics = train_update(body, codec="int8")
    response = _upload(worker_client, task.pk, _with_chunk(data, chunk), metrics_json(**metrics))
    body = _error(response, 400, "chunk", in_fields=False)  # the upload's metadata key, named in the detail
    assert body["error"] == "invalid_update" and "not an allowed size" in body["detail"]
    task.refresh_from_db()
    assert task.status != Task.Status.COMPLETED


def test_update_with_deep_header_is_400(claimed, worker_client, checkpoint_storage):  # noqa: F811
    task, body = claimed
    _, metrics = train_update(body)
    header = b'{"__metadata__":{},"x":' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    data = len(header).to_bytes(8, "little") + header
    response = _upload(worker_client, task.pk, data, metrics_json(**metrics))
    assert response.status_code == 400 and "nested deeper than" in response.json()["detail"]


def test_the_agents_int8_encoding_still_passes(claimed, worker_client, checkpoint_storage):  # noqa: F811
    task, body = claimed
    data, metrics = train_update(body, codec="int8")
    assert _upload(worker_client, task.pk, data, metrics_json(**metrics)).status_code == 202
