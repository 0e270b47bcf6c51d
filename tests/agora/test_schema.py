"""The OpenAPI schema describes what the API really answers: paginated shapes, one error body, every error
code an operation can produce, who may call it. (``test_schema_fuzz.py`` checks it against a live server.)"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.django_db

ERROR = {"$ref": "#/components/schemas/Error"}
WORKER_OPERATIONS = [
    ("post", "/api/v1/workers/heartbeat"), ("get", "/api/v1/workers/me"), ("post", "/api/v1/tasks/claim"),
    ("post", "/api/v1/tasks/{task_id}/result"), ("post", "/api/v1/tasks/{task_id}/fail"),
]
STATE_CHANGES = [
    "/api/v1/proposals/{id}/vote", "/api/v1/proposals/{id}/open", "/api/v1/proposals/{id}/cancel",
    "/api/v1/proposals/{id}/approve", "/api/v1/proposals/{id}/veto", "/api/v1/proposals/{id}/comments",
    "/api/v1/runs/{id}/cancel", "/api/v1/workers/{worker_id}/suspend", "/api/v1/workers/{worker_id}/reinstate",
    "/api/v1/workers/{worker_id}/revoke", "/api/v1/tasks/{task_id}/result", "/api/v1/tasks/{task_id}/fail",
]


@pytest.fixture(scope="module")
def schema(django_db_blocker):
    from rest_framework.test import APIClient

    with django_db_blocker.unblock():
        response = APIClient().get("/api/schema/?format=json")
    assert response.status_code == 200
    return response.json()


def _operations(schema):
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            yield method, path, operation


@pytest.mark.parametrize("path, component", [
    ("/api/v1/proposals/", "PaginatedProposalListOutputList"),
    ("/api/v1/runs/", "PaginatedRunListList"),
    ("/api/v1/workers/", "PaginatedWorkerOutList"),
])
def test_lists_are_documented_as_the_paginated_object_with_bounded_parameters(schema, path, component):
    operation = schema["paths"][path]["get"]
    assert operation["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": f"#/components/schemas/{component}"}
    page = schema["components"]["schemas"][component]
    assert {"count", "next", "previous", "results"} <= set(page["properties"])
    assert page["properties"]["results"]["type"] == "array"
    parameters = {p["name"]: p["schema"] for p in operation["parameters"]}
    assert parameters["limit"]["minimum"] == 1 and parameters["limit"]["maximum"] == 100
    assert parameters["offset"]["minimum"] == 0 and parameters["offset"]["maximum"] == 1_000_000


def test_the_error_body_is_one_component(schema):
    error = schema["components"]["schemas"]["Error"]
    assert set(error["properties"]) == {"error", "detail", "fields"}
    assert set(error["required"]) == {"error", "detail"}


def test_every_operation_documents_400_and_every_error_has_the_error_body(schema):
    for method, path, operation in _operations(schema):
        responses = operation["responses"]
        assert "400" in responses, (method, path)
        for code, response in responses.items():
            if code[0] in "45":
                assert response["content"]["application/json"]["schema"] == ERROR, (method, path, code)


def test_path_parameters_mean_404_and_bodies_mean_415(schema):
    for method, path, operation in _operations(schema):
        if "{" in path:
            assert "404" in operation["responses"], (method, path)
        if "requestBody" in operation:
            assert "415" in operation["responses"], (method, path)


@pytest.mark.parametrize("method, path", WORKER_OPERATIONS)
def test_worker_operations_take_the_worker_token_and_document_401_and_403(schema, method, path):
    operation = schema["paths"][path][method]
    assert operation["security"] == [{"workerToken": []}]
    assert {"401", "403"} <= set(operation["responses"])


def test_member_writes_need_a_token_or_session_and_reads_are_public(schema):
    create = schema["paths"]["/api/v1/proposals/"]["post"]
    assert {} not in create["security"] and {"tokenAuth": []} in create["security"]
    assert {"401", "403"} <= set(create["responses"])
    assert {} in schema["paths"]["/api/v1/proposals/"]["get"]["security"]
    worker_scheme = schema["components"]["securitySchemes"]["workerToken"]
    assert (worker_scheme["type"], worker_scheme["scheme"]) == ("http", "bearer")


@pytest.mark.parametrize("path", STATE_CHANGES)
def test_state_changes_document_409(schema, path):
    assert "409" in schema["paths"][path]["post"]["responses"]


@pytest.mark.parametrize("method, path", [
    ("post", "/api/v1/auth/token"), ("post", "/api/v1/workers/enroll"), ("post", "/api/v1/workers/heartbeat"),
    ("post", "/api/v1/tasks/claim"), ("post", "/api/v1/proposals/{id}/comments"),
])
def test_throttled_operations_document_429_with_retry_after(schema, method, path):
    response = schema["paths"][path][method]["responses"]["429"]
    assert "Retry-After" in response["headers"]


def test_a_throttle_that_counts_only_writes_leaves_reads_without_429(schema):
    assert "429" not in schema["paths"]["/api/v1/proposals/{id}/comments"]["get"]["responses"]


def test_the_upload_is_documented_as_multipart_with_its_limits(schema):
    operation = schema["paths"]["/api/v1/tasks/{task_id}/result"]["post"]
    body = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["properties"]["update"] == {**body["properties"]["update"], "type": "string", "format": "binary"}
    assert set(body["required"]) == {"update", "metrics"}
    assert {"202", "400", "401", "403", "404", "409", "410", "413", "415"} <= set(operation["responses"])
