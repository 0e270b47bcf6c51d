"""Delegation: a member lets another vote for them overall or per kind; a direct vote wins; revocable;
no chains; tallies count the delegated weight; ledger entries and the API."""

from __future__ import annotations

import pytest
from django.test import override_settings
from rest_framework import serializers

from governance import services
from governance.models import Delegation, Vote
from governance.selectors import proposal_tally
from ledger.models import Entry
from tests.factories import UserFactory
from tests.governance.factories import guardrail_spec

# Many members, so no vote here is settled early by accident.
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("crowd")]


@pytest.fixture
def crowd():
    return UserFactory.create_batch(8)


@pytest.fixture
def ada():
    return UserFactory(username="ada")


@pytest.fixture
def bob():
    return UserFactory(username="bob")


def open_proposal(kind="training"):
    author = UserFactory()
    spec = {} if kind == "training" else guardrail_spec()
    return services.proposal_submit(author=author, kind=kind, title=f"A {kind} proposal", spec=spec, open_now=True)


def test_the_delegates_vote_counts_for_the_delegator_with_their_weight(ada, bob):
    services.delegation_set(delegator=ada, delegate=bob)
    proposal = open_proposal()
    services.vote_cast(proposal=proposal, voter=bob, choice="yes")
    carried = Vote.objects.get(proposal=proposal, voter=ada)
    assert carried.via == bob and carried.choice == "yes" and carried.weight == 1
    tally = proposal_tally(proposal=proposal)
    assert tally.yes == 2 and tally.votes == 2
    entry = Entry.objects.get(subject=proposal.ledger_subject, action="vote.cast", actor="bob")
    assert entry.payload["delegated"] == [{"voter": ada.pk, "weight": 1}]

    services.vote_cast(proposal=proposal, voter=bob, choice="no")  # the delegate changes their mind
    assert Vote.objects.get(proposal=proposal, voter=ada).choice == "no"
    assert proposal_tally(proposal=proposal).no == 2


def test_a_direct_vote_overrides_the_delegate_before_and_after(ada, bob):
    services.delegation_set(delegator=ada, delegate=bob)
    before = open_proposal()
    services.vote_cast(proposal=before, voter=ada, choice="no")
    services.vote_cast(proposal=before, voter=bob, choice="yes")
    assert Vote.objects.get(proposal=before, voter=ada).choice == "no"

    after = open_proposal()
    services.vote_cast(proposal=after, voter=bob, choice="yes")
    services.vote_cast(proposal=after, voter=ada, choice="no")
    own = Vote.objects.get(proposal=after, voter=ada)
    assert own.via is None and own.choice == "no"
    entry = Entry.objects.filter(subject=after.ledger_subject, actor="ada").get()
    assert entry.action == "vote.cast" and entry.payload["overrides_delegate"] == bob.pk
    services.vote_cast(proposal=after, voter=bob, choice="abstain")
    assert Vote.objects.get(proposal=after, voter=ada).choice == "no"
    assert proposal_tally(proposal=after).no == 1 and proposal_tally(proposal=after).abstain == 1


def test_a_delegation_for_a_kind_wins_over_the_overall_one(ada, bob):
    carol = UserFactory(username="carol")
    services.delegation_set(delegator=ada, delegate=bob)
    services.delegation_set(delegator=ada, delegate=carol, kind="guardrail")
    training, guardrail = open_proposal("training"), open_proposal("guardrail")
    for proposal in (training, guardrail):
        services.vote_cast(proposal=proposal, voter=bob, choice="yes")
        services.vote_cast(proposal=proposal, voter=carol, choice="no")
    assert Vote.objects.get(proposal=training, voter=ada).via == bob
    assert Vote.objects.get(proposal=guardrail, voter=ada).via == carol
    assert Vote.objects.get(proposal=guardrail, voter=ada).choice == "no"


def test_delegating_after_the_delegate_voted_counts_at_once_and_revoking_withdraws_it(ada, bob):
    proposal = open_proposal()
    services.vote_cast(proposal=proposal, voter=bob, choice="yes")
    services.delegation_set(delegator=ada, delegate=bob)
    assert Vote.objects.get(proposal=proposal, voter=ada).via == bob
    entry = Entry.objects.get(action="delegation.set")
    assert entry.payload["delegate"] == bob.pk and entry.payload["topic"] == "all"
    assert entry.payload["votes_updated_on"] == [proposal.pk]

    assert services.delegation_revoke(delegator=ada) is True
    assert not Vote.objects.filter(proposal=proposal, voter=ada).exists()
    assert proposal_tally(proposal=proposal).yes == 1
    assert Entry.objects.get(action="delegation.revoked").payload["votes_updated_on"] == [proposal.pk]
    assert services.delegation_revoke(delegator=ada) is False
    assert Entry.objects.filter(action="delegation.revoked").count() == 1


def test_revoking_leaves_closed_votes_alone(ada, bob, staff):
    proposal = open_proposal()
    services.delegation_set(delegator=ada, delegate=bob)
    services.vote_cast(proposal=proposal, voter=bob, choice="yes")
    services.proposal_close_early(proposal=proposal, by=staff, reason="Done")
    services.delegation_revoke(delegator=ada)
    assert Vote.objects.get(proposal=proposal, voter=ada).via == bob


@override_settings(AGORA_VOTER_ELIGIBILITY="verified_email")
def test_an_ineligible_delegator_is_not_counted(bob):
    unverified = UserFactory(verified=False)
    services.delegation_set(delegator=unverified, delegate=bob)
    proposal = open_proposal()
    services.vote_cast(proposal=proposal, voter=bob, choice="yes")
    assert not Vote.objects.filter(proposal=proposal, voter=unverified).exists()


def test_chains_and_self_delegation_are_refused_and_nothing_is_stored(ada, bob):
    carol = UserFactory(username="carol")
    services.delegation_set(delegator=ada, delegate=bob)
    entries = Entry.objects.count()
    cases = [
        dict(delegator=carol, delegate=ada, kind=""),  # ada has delegated: carol -> ada -> bob
        dict(delegator=carol, delegate=ada, kind="training"),  # ada's overall delegation covers training
        dict(delegator=bob, delegate=carol, kind=""),  # others delegate to bob
        dict(delegator=bob, delegate=carol, kind="guardrail"),
        dict(delegator=carol, delegate=carol, kind=""),
        dict(delegator=carol, delegate=None, kind=""),
    ]
    for case in cases:
        with pytest.raises(serializers.ValidationError) as info:
            services.delegation_set(**case)
        assert "delegate" in info.value.detail, case
    with pytest.raises(serializers.ValidationError) as info:
        services.delegation_set(delegator=carol, delegate=bob, kind="everything")
    assert "kind" in info.value.detail
    assert Delegation.objects.count() == 1 and Entry.objects.count() == entries


def test_delegations_api(ada, bob):
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_authenticate(ada)
    response = client.post("/api/v1/delegations/", {"delegate": "bob", "kind": "training"}, format="json")
    assert response.status_code == 201 and response.json()["delegate"] == "bob"
    response = client.post("/api/v1/delegations/", {"delegate": "nobody"}, format="json")
    assert response.status_code == 400 and "delegate" in response.json()["detail"]
    assert client.get("/api/v1/delegations/").json()["mine"][0]["kind"] == "training"
    bob_client = APIClient()
    bob_client.force_authenticate(bob)
    assert bob_client.get("/api/v1/delegations/").json()["to_me"][0]["delegator"] == "ada"
    assert client.delete("/api/v1/delegations/all").status_code == 404
    assert client.delete("/api/v1/delegations/training").status_code == 204
    assert client.delete("/api/v1/delegations/everything").status_code == 400
    assert not Delegation.objects.exists()


def test_delegation_page_and_the_proposal_page_show_it(client, ada, bob):
    client.force_login(ada)
    response = client.post("/delegations/", {"action": "set", "delegate": "bob", "kind": ""})
    assert response.status_code == 302
    html = client.get("/delegations/").content.decode()
    assert "bob" in html and "All proposals" in html
    proposal = open_proposal()
    services.vote_cast(proposal=proposal, voter=bob, choice="yes")
    html = client.get(proposal.get_absolute_url()).content.decode()
    assert "You delegated all proposals to <strong>bob</strong>" in html
    assert "via bob" in html
    response = client.post("/delegations/", {"action": "set", "delegate": "ada", "kind": ""})
    assert response.status_code == 400 and "yourself" in response.content.decode()
    client.post("/delegations/", {"action": "revoke", "kind": ""})
    assert not Delegation.objects.exists()


def test_the_profile_shows_both_directions(client, ada, bob):
    services.delegation_set(delegator=ada, delegate=bob, kind="guardrail")
    client.force_login(ada)
    section = client.get("/accounts/profile/").content.decode().split('id="profile-delegations"')[1]
    assert "You delegate guardrail proposals to <strong>bob</strong>" in section
    client.force_login(bob)
    section = client.get("/accounts/profile/").content.decode().split('id="profile-delegations"')[1]
    assert "<strong>ada</strong> (guardrail proposals)" in section


def test_the_admin_shows_delegations_and_cannot_add_them(client, ada, bob):
    services.delegation_set(delegator=ada, delegate=bob)
    client.force_login(UserFactory(is_staff=True, is_superuser=True))
    assert "bob" in client.get("/admin/governance/delegation/").content.decode()
    assert client.get("/admin/governance/delegation/add/").status_code == 403
    assert client.get("/admin/governance/notification/add/").status_code == 403
