"""Who may do what to a proposal in which state, through the API: role × state × action.

Every denial must also leave the proposal, its votes, comments and the ledger exactly as they were.
"""

import pytest
from django.test import override_settings
from rest_framework.test import APIClient

from governance.models import Comment, Proposal, Vote
from ledger.models import Entry
from tests.factories import UserFactory
from tests.governance.factories import ProposalFactory

pytestmark = pytest.mark.django_db

ROLES = ["anonymous", "member", "author", "staff"]
STATES = ["draft", "active", "succeeded", "defeated", "approved", "vetoed", "enacted", "canceled"]
ACTIONS = {
    "vote": {"choice": "yes"},
    "approve": {},
    "veto": {"reason": "Not now."},
    "cancel": {},
    "open": {},
    "comments": {"body": "Looks good."},
}

# The expected status for every (action, role, state). 401: not logged in; 403: role may not; 409: wrong state.
EXPECTED: dict[tuple[str, str], dict[str, int]] = {}
for action in ACTIONS:
    EXPECTED[(action, "anonymous")] = dict.fromkeys(STATES, 401)
EXPECTED[("vote", "member")] = {s: 200 if s == "active" else 409 for s in STATES}
EXPECTED[("vote", "author")] = {s: 200 if s == "active" else 409 for s in STATES}
EXPECTED[("vote", "staff")] = {s: 200 if s == "active" else 409 for s in STATES}
for action in ("approve", "veto"):
    EXPECTED[(action, "member")] = dict.fromkeys(STATES, 403)
    EXPECTED[(action, "author")] = dict.fromkeys(STATES, 403)
    EXPECTED[(action, "staff")] = {s: 200 if s == "succeeded" else 409 for s in STATES}
EXPECTED[("cancel", "member")] = dict.fromkeys(STATES, 403)
EXPECTED[("cancel", "staff")] = dict.fromkeys(STATES, 403)
EXPECTED[("cancel", "author")] = {s: 200 if s in ("draft", "active") else 409 for s in STATES}
EXPECTED[("open", "member")] = dict.fromkeys(STATES, 403)
EXPECTED[("open", "staff")] = dict.fromkeys(STATES, 403)
EXPECTED[("open", "author")] = {s: 200 if s == "draft" else 409 for s in STATES}
for role in ("member", "author", "staff"):
    EXPECTED[("comments", role)] = {s: 409 if s == "canceled" else 201 for s in STATES}

CASES = [
    pytest.param(action, role, state, EXPECTED[(action, role)][state], id=f"{action}-{role}-{state}")
    for action in ACTIONS
    for role in ROLES
    for state in STATES
]


def snapshot(proposal: Proposal) -> tuple:
    proposal.refresh_from_db()
    return (
        proposal.status, proposal.opens_at, proposal.closes_at, proposal.decided_by_id, proposal.veto_reason,
        list(Vote.objects.values_list("voter_id", "choice")), Comment.objects.count(), Entry.objects.count(),
    )


@pytest.mark.parametrize(("action", "role", "state", "expected"), CASES)
@override_settings(AGORA_EARLY_CLOSE=False)  # the vote stays open whoever has voted
def test_permission_matrix(action, role, state, expected):
    author = UserFactory()
    proposal = ProposalFactory(author=author, status=state)
    client = APIClient()
    if role != "anonymous":
        user = {"member": UserFactory, "staff": lambda: UserFactory(is_staff=True)}.get(role, lambda: author)()
        client.force_authenticate(user)
    before = snapshot(proposal)

    response = client.post(f"/api/v1/proposals/{proposal.pk}/{action}", ACTIONS[action], format="json")

    assert response.status_code == expected, response.content
    if expected >= 400:
        assert response.json()["error"]
        assert snapshot(proposal) == before
    else:
        assert snapshot(proposal) != before
        assert Entry.objects.count() == before[-1] + 1
