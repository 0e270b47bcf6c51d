"""Member API: list with filters, search and pagination, detail with tally and my vote, guardrails, schema."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tests.factories import UserFactory
from tests.governance.factories import GuardrailFactory, ProposalFactory, VoteFactory

pytestmark = pytest.mark.django_db


def test_create_with_curl_shape_then_vote_and_read_back(member_client, member):
    created = member_client.post("/api/v1/proposals/", {
        "kind": "guardrail", "title": "No credentials in training data", "body": "Keys *leak*.",
        "spec": {"kind": "data_filter", "patterns": ["password\\s*="]}}, format="json")
    assert created.status_code == 201
    pk = created.json()["id"]
    voted = member_client.post(f"/api/v1/proposals/{pk}/vote", {"choice": "yes"}, format="json")
    assert voted.status_code == 200
    assert voted.json()["tally"]["yes"] == 1 and voted.json()["vote"]["choice"] == "yes"
    detail = member_client.get(f"/api/v1/proposals/{pk}/").json()
    assert detail["my_vote"] == "yes" and detail["tally"]["votes"] == 1
    assert detail["body_html"] == "<p>Keys <em>leak</em>.</p>"
    assert detail["spec"] == {"action": "adopt", "kind": "data_filter", "patterns": ["password\\s*="],
                              "description": ""}
    assert detail["quorum"] == 3 and detail["threshold"] == 0.5


def test_draft_then_open_and_cancel_through_the_api(member_client):
    pk = member_client.post("/api/v1/proposals/", {"kind": "training", "title": "Draft run", "spec": {},
                                                   "open": False}, format="json").json()["id"]
    assert member_client.get(f"/api/v1/proposals/{pk}/").json()["status"] == "draft"
    assert member_client.post(f"/api/v1/proposals/{pk}/open").json()["status"] == "active"
    assert member_client.post(f"/api/v1/proposals/{pk}/cancel").json()["status"] == "canceled"


def test_list_filters_search_and_paginates(api_client, member):
    ProposalFactory(title="Train on the docs", kind="training", status="active")
    ProposalFactory(title="Ban passwords", kind="guardrail", status="active", body="secret stuff")
    ProposalFactory(title="Old run", kind="training", status="defeated")
    ProposalFactory.create_batch(25, status="draft")

    def ids(**params):
        return [row["title"] for row in api_client.get("/api/v1/proposals/", params).json()["results"]]

    assert ids(kind="guardrail") == ["Ban passwords"]
    assert ids(status="defeated") == ["Old run"]
    assert ids(q="SECRET") == ["Ban passwords"]  # searches the body too, case-insensitively
    assert ids(q="docs", kind="training", status="active") == ["Train on the docs"]
    page = api_client.get("/api/v1/proposals/", {"limit": 10, "offset": 10}).json()
    assert page["count"] == 28 and len(page["results"]) == 10 and page["next"] and page["previous"]
    bad = api_client.get("/api/v1/proposals/", {"status": "pending"})
    assert bad.status_code == 400 and "status" in bad.json()["fields"]


def test_list_rows_carry_tallies_and_my_vote(member_client, member):
    proposal = ProposalFactory(status="active")
    VoteFactory(proposal=proposal, voter=member, choice="no")
    VoteFactory.create_batch(2, proposal=proposal, choice="yes")
    row = member_client.get("/api/v1/proposals/").json()["results"][0]
    assert row["tally"]["yes"] == 2 and row["tally"]["no"] == 1 and row["tally"]["votes"] == 3
    assert row["my_vote"] == "no"


def make_rows(n: int) -> None:
    voters = UserFactory.create_batch(3)
    for proposal in ProposalFactory.create_batch(n, status="active"):
        for voter in voters:
            VoteFactory(proposal=proposal, voter=voter)


@pytest.mark.parametrize("url", ["/api/v1/proposals/?limit=100", "/proposals/"])
def test_query_count_does_not_grow_with_rows(client, member, url):
    client.force_login(member)
    make_rows(5)
    with CaptureQueriesContext(connection) as few:
        assert client.get(url).status_code == 200
    make_rows(45)
    with CaptureQueriesContext(connection) as many:
        assert client.get(url).status_code == 200
    assert len(many) == len(few), [q["sql"] for q in many.captured_queries]


def test_list_api_has_a_fixed_query_budget(api_client, django_assert_max_num_queries):
    make_rows(50)
    with django_assert_max_num_queries(3):  # count, page (with annotated tallies and authors)
        assert len(api_client.get("/api/v1/proposals/?limit=100").json()["results"]) == 50


def test_guardrails_api_lists_active_ones_in_the_agent_shape(api_client):
    active = GuardrailFactory(kind="output_filter", patterns=["(?i)kill"], description="d")
    GuardrailFactory(active=False, retired_at="2026-01-01T00:00:00Z")
    assert api_client.get("/api/v1/guardrails/").json() == [
        {"id": active.pk, "title": active.title, "kind": "output_filter", "patterns": ["(?i)kill"],
         "description": "d"}
    ]
    assert api_client.get("/api/v1/guardrails/?kind=data_filter").json() == []
    assert api_client.get("/api/v1/guardrails/?kind=nope").status_code == 400


def test_comments_api(member_client, api_client):
    proposal = ProposalFactory(status="active")
    assert member_client.post(f"/api/v1/proposals/{proposal.pk}/comments", {"body": "**Yes**"},
                              format="json").status_code == 201
    assert api_client.post(f"/api/v1/proposals/{proposal.pk}/comments", {"body": "anon"},
                           format="json").status_code == 401
    comments = api_client.get(f"/api/v1/proposals/{proposal.pk}/comments").json()
    assert [c["body_html"] for c in comments] == ["<p><strong>Yes</strong></p>"]


def test_errors_use_the_project_shape(member_client, staff_client):
    proposal = ProposalFactory(status="defeated")
    response = staff_client.post(f"/api/v1/proposals/{proposal.pk}/approve")
    assert response.status_code == 409
    assert response.json() == {"error": "invalid_state",
                               "detail": "only a succeeded proposal can be approved, not one that is defeated"}
    missing = staff_client.post(f"/api/v1/proposals/{proposal.pk}/veto", {}, format="json")
    assert missing.status_code == 400 and "reason" in missing.json()["fields"]
    assert member_client.get("/api/v1/proposals/999999/").status_code == 404


def test_approve_and_veto_through_the_api(staff_client):
    first, second = ProposalFactory(status="succeeded"), ProposalFactory(status="succeeded")
    approved = staff_client.post(f"/api/v1/proposals/{first.pk}/approve").json()
    assert approved["status"] == "approved" and approved["decided_by"]
    vetoed = staff_client.post(f"/api/v1/proposals/{second.pk}/veto", {"reason": "Too big"}, format="json").json()
    assert vetoed["status"] == "vetoed" and vetoed["veto_reason"] == "Too big"


def test_schema_documents_the_governance_api(api_client):
    schema = api_client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    paths = schema["paths"]
    for path in ["/api/v1/proposals/", "/api/v1/proposals/{id}/", "/api/v1/proposals/{id}/vote",
                 "/api/v1/proposals/{id}/approve", "/api/v1/proposals/{id}/veto", "/api/v1/guardrails/"]:
        assert path in paths, sorted(paths)
    vote_body = paths["/api/v1/proposals/{id}/vote"]["post"]["requestBody"]["content"]["application/json"]
    assert vote_body["schema"]["$ref"].endswith("/VoteInput")
    assert "veto_reason" in schema["components"]["schemas"]["ProposalDetailOutput"]["properties"]

