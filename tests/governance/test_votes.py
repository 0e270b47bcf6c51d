"""One vote per member, changeable while active, weighted by the configured strategy."""

from decimal import Decimal

import pytest
from django.db import IntegrityError, transaction
from django.test import override_settings

from governance import services
from governance.models import Vote
from governance.selectors import proposal_tally
from ledger.models import Entry
from ledger.selectors import ledger_verify
from tests.factories import UserFactory
from tests.governance.factories import ProposalFactory, VoteFactory

pytestmark = pytest.mark.django_db


def fake_compute_weighted(user) -> Decimal:
    """Stands in for marketplace.voting.compute_weighted: heavier for users whose name ends in 'heavy'."""
    return Decimal("2.5") if user.username.endswith("heavy") else Decimal(1)


def test_the_database_refuses_a_second_vote_row(member):
    vote = VoteFactory(voter=member)
    with pytest.raises(IntegrityError), transaction.atomic():
        Vote.objects.create(proposal=vote.proposal, voter=member, choice="no", weight=1)
    assert Vote.objects.count() == 1


@override_settings(AGORA_EARLY_CLOSE=False)  # the vote stays open whoever has voted
def test_changing_a_vote_keeps_one_row_and_records_the_change(member):
    proposal = ProposalFactory(status="active")
    services.vote_cast(proposal=proposal, voter=member, choice="yes")
    services.vote_cast(proposal=proposal, voter=member, choice="yes")  # same again: nothing happens
    services.vote_cast(proposal=proposal, voter=member, choice="no")
    assert list(Vote.objects.values_list("choice", flat=True)) == ["no"]
    tally = proposal_tally(proposal=proposal)
    assert (tally.yes, tally.no, tally.votes) == (0, 1, 1)
    entries = [(e.action, e.payload) for e in Entry.objects.filter(subject=proposal.ledger_subject).order_by("seq")]
    age_days = (proposal.opens_at - member.date_joined).days  # measured when the vote opened
    basis = {"rule": "verified_email,account_age:7d", "verified_email": True, "account_age_days": age_days}
    assert entries == [
        ("vote.cast", {"choice": "yes", "previous": None, "weight": 1, "eligibility": basis}),
        ("vote.changed", {"choice": "no", "previous": "yes", "weight": 1, "eligibility": basis}),
    ]
    assert ledger_verify().ok


def test_an_unknown_choice_is_a_field_error(member_client):
    proposal = ProposalFactory(status="active")
    response = member_client.post(f"/api/v1/proposals/{proposal.pk}/vote", {"choice": "maybe"}, format="json")
    assert response.status_code == 400 and "choice" in response.json()["fields"]
    assert not Vote.objects.exists()


@override_settings(AGORA_VOTE_WEIGHT_STRATEGY="tests.governance.test_votes.fake_compute_weighted")
def test_compute_weighted_strategy_from_settings_is_recorded_on_the_vote():
    proposal = ProposalFactory(status="active")
    heavy = UserFactory(username="gpu-heavy")
    light = UserFactory(username="light")
    services.vote_cast(proposal=proposal, voter=heavy, choice="yes")
    services.vote_cast(proposal=proposal, voter=light, choice="no")
    assert Vote.objects.get(voter=heavy).weight == Decimal("2.5")
    tally = proposal_tally(proposal=proposal)
    assert (tally.yes, tally.no, tally.total) == (Decimal("2.5"), Decimal(1), Decimal("3.5"))
    assert tally.quorum_reached and tally.passing  # 3.5 ≥ 3 and 2.5/3.5 > 0.5
    # The weight was recorded when cast: switching strategy later does not rewrite it.
    with override_settings(AGORA_VOTE_WEIGHT_STRATEGY="governance.weights.one_member_one_vote"):
        assert proposal_tally(proposal=proposal).yes == Decimal("2.5")


def test_default_strategy_is_one_member_one_vote(member):
    proposal = ProposalFactory(status="active")
    vote = services.vote_cast(proposal=proposal, voter=member, choice="abstain")
    assert vote.weight == Decimal(1)
