"""Voting windows chosen per proposal, the automatic early close once the outcome is settled, and staff
closing a vote early with a reason."""

from __future__ import annotations

import itertools
from datetime import timedelta
from decimal import Decimal

import pytest
from django.test import override_settings
from rest_framework import serializers

from governance import services
from governance.errors import NotAllowed, ProposalStateError
from governance.models import Guardrail, Proposal
from governance.selectors import Tally
from governance.tasks import close_due_proposals
from ledger.models import Entry
from tests.factories import UserFactory
from tests.governance.factories import guardrail_spec

pytestmark = pytest.mark.django_db
WINDOW = {"AGORA_VOTING_MIN": timedelta(hours=1), "AGORA_VOTING_MAX": timedelta(hours=48),
          "AGORA_VOTING_PERIOD": timedelta(hours=24)}


def closed_entry(proposal) -> dict:
    return Entry.objects.get(subject=proposal.ledger_subject, action="proposal.closed").payload


@override_settings(**WINDOW)
def test_the_author_chooses_the_window_within_bounds_and_the_default_applies_otherwise(member):
    chosen = services.proposal_submit(author=member, kind="training", title="Two hours", spec={}, voting_hours=2,
                                      open_now=True)
    default = services.proposal_submit(author=member, kind="training", title="Default", spec={}, open_now=True)
    assert chosen.closes_at - chosen.opens_at == timedelta(hours=2)
    assert default.closes_at - default.opens_at == timedelta(hours=24)
    opened = Entry.objects.get(subject=chosen.ledger_subject, action="proposal.opened").payload
    assert opened["closes_at"] == chosen.closes_at.isoformat()


@override_settings(**WINDOW)
@pytest.mark.parametrize("hours", [0.5, 49, -1, "nan", "inf", "soon"])
def test_a_window_outside_the_bounds_is_a_field_error_and_nothing_is_stored(member, member_client, hours):
    with pytest.raises(serializers.ValidationError) as info:
        services.proposal_submit(author=member, kind="training", title="Bad window", spec={}, voting_hours=hours)
    assert "voting_hours" in info.value.detail
    response = member_client.post("/api/v1/proposals/", {"kind": "training", "title": "Bad window", "spec": {},
                                                         "voting_hours": hours}, format="json")
    assert response.status_code == 400 and "voting_hours" in response.json()["detail"]
    assert not Proposal.objects.exists() and not Entry.objects.exists()


@override_settings(AGORA_QUORUM_MIN=3, AGORA_QUORUM_FRACTION=0, AGORA_PASS_THRESHOLD=0.5)
def test_a_guardrail_closes_and_takes_effect_as_soon_as_the_remaining_weight_cannot_change_it():
    author, *voters = UserFactory.create_batch(5)
    proposal = services.proposal_submit(author=author, kind="guardrail", title="No secrets", spec=guardrail_spec(),
                                        open_now=True)
    services.vote_cast(proposal=proposal, voter=voters[0], choice="yes")
    services.vote_cast(proposal=proposal, voter=voters[1], choice="yes")
    proposal.refresh_from_db()
    assert proposal.status == "active"  # 2 yes, 3 members left: quorum still open
    services.vote_cast(proposal=proposal, voter=voters[2], choice="yes")
    proposal.refresh_from_db()
    # 3 yes of 5: even two more no votes leave yes at 3/5 > 0.5, and the quorum of 3 is reached.
    assert proposal.status == "enacted" and proposal.close_reason == "decided"
    assert proposal.closed_at < proposal.closes_at
    payload = closed_entry(proposal)
    assert payload["early"] is True and payload["reason"] == "decided" and payload["outcome"] == "succeeded"
    assert Guardrail.objects.get(proposal=proposal).active
    with pytest.raises(ProposalStateError):
        services.vote_cast(proposal=proposal, voter=voters[3], choice="no")


@override_settings(AGORA_QUORUM_MIN=3, AGORA_QUORUM_FRACTION=0, AGORA_PASS_THRESHOLD=0.5)
def test_a_defeat_that_is_settled_closes_too_and_an_open_question_stays_open():
    author, a, b, c, d = UserFactory.create_batch(5)
    open_question = services.proposal_submit(author=author, kind="training", title="Open", spec={}, open_now=True)
    services.vote_cast(proposal=open_question, voter=a, choice="yes")
    services.vote_cast(proposal=open_question, voter=b, choice="yes")
    services.vote_cast(proposal=open_question, voter=c, choice="no")
    open_question.refresh_from_db()
    assert open_question.status == "active"  # 2 yes 1 no, 2 left: could end 4-1 or 2-3

    defeated = services.proposal_submit(author=author, kind="training", title="Doomed", spec={}, open_now=True)
    for voter in (a, b, c):
        services.vote_cast(proposal=defeated, voter=voter, choice="no")
    defeated.refresh_from_db()
    assert defeated.status == "defeated" and defeated.close_reason == "decided"
    assert closed_entry(defeated)["tally"]["no"] == 3


@override_settings(AGORA_QUORUM_MIN=3, AGORA_QUORUM_FRACTION=0, AGORA_EARLY_CLOSE=False)
def test_early_close_can_be_switched_off():
    author, *voters = UserFactory.create_batch(4)
    proposal = services.proposal_submit(author=author, kind="training", title="Wait it out", spec={}, open_now=True)
    for voter in voters:
        services.vote_cast(proposal=proposal, voter=voter, choice="yes")
    proposal.refresh_from_db()
    assert proposal.status == "active"
    assert close_due_proposals() == []


@override_settings(AGORA_QUORUM_MIN=2, AGORA_QUORUM_FRACTION=0)
def test_the_beat_closes_a_vote_whose_outcome_became_settled_between_votes(settings):
    author, a, b = UserFactory.create_batch(3)
    proposal = services.proposal_submit(author=author, kind="training", title="Settled later", spec={}, open_now=True)
    settings.AGORA_EARLY_CLOSE = False
    services.vote_cast(proposal=proposal, voter=a, choice="yes")
    services.vote_cast(proposal=proposal, voter=b, choice="yes")
    settings.AGORA_EARLY_CLOSE = True
    assert close_due_proposals() == [proposal.pk]
    proposal.refresh_from_db()
    assert proposal.status == "succeeded" and proposal.close_reason == "decided"
    assert close_due_proposals() == []


def test_staff_close_early_with_a_reason_and_closing_again_changes_nothing(member, staff, other_member):
    proposal = services.proposal_submit(author=member, kind="training", title="Stop", spec={}, open_now=True)
    services.vote_cast(proposal=proposal, voter=other_member, choice="yes")
    with pytest.raises(NotAllowed):
        services.proposal_close_early(proposal=proposal, by=member, reason="mine")
    with pytest.raises(serializers.ValidationError) as info:
        services.proposal_close_early(proposal=proposal, by=staff, reason="  ")
    assert "reason" in info.value.detail
    proposal.refresh_from_db()
    assert proposal.status == "active"
    services.proposal_close_early(proposal=proposal, by=staff, reason="The dataset licence was withdrawn.")
    proposal.refresh_from_db()
    assert proposal.status == "defeated"  # one vote of weight 1 is under the quorum of 3
    assert proposal.close_reason == "The dataset licence was withdrawn."
    entries = Entry.objects.filter(subject=proposal.ledger_subject, action="proposal.closed")
    assert entries.count() == 1 and entries.get().actor == staff.username
    assert entries.get().payload["reason"] == "The dataset licence was withdrawn."
    again = services.proposal_close_early(proposal=proposal, by=staff, reason="twice")
    assert again.status == "defeated" and entries.count() == 1
    assert services.proposal_close(proposal_id=proposal.pk).status == "defeated" and entries.count() == 1


def test_close_early_api_is_staff_only_and_names_the_reason(member, staff_client, member_client):
    proposal = services.proposal_submit(author=member, kind="training", title="Stop", spec={}, open_now=True)
    assert member_client.post(f"/api/v1/proposals/{proposal.pk}/close", {"reason": "x"}, format="json").status_code == 403
    response = staff_client.post(f"/api/v1/proposals/{proposal.pk}/close", {}, format="json")
    assert response.status_code == 400 and "reason" in response.json()["detail"]
    response = staff_client.post(f"/api/v1/proposals/{proposal.pk}/close", {"reason": "Duplicate of #1"}, format="json")
    assert response.status_code == 200
    assert response.json()["status"] == "defeated" and response.json()["close_reason"] == "Duplicate of #1"


def test_staff_close_early_from_the_page(client, member, staff):
    proposal = services.proposal_submit(author=member, kind="training", title="Stop", spec={}, open_now=True)
    client.force_login(member)
    assert 'id="staff-close"' not in client.get(proposal.get_absolute_url()).content.decode()
    assert client.post(f"/proposals/{proposal.pk}/close", {"reason": "x"}).status_code == 403
    client.force_login(staff)
    assert 'id="staff-close"' in client.get(proposal.get_absolute_url()).content.decode()
    client.post(f"/proposals/{proposal.pk}/close", {"reason": "Withdrawn by the lab"})
    html = client.get(proposal.get_absolute_url()).content.decode()
    assert 'id="closed-early"' in html and "Withdrawn by the lab" in html


def _outcomes(yes, no, abstain, rest, quorum, threshold) -> set[bool]:
    """Brute force: every way the remaining members (weight 1 each) could vote, or not."""
    results = set()
    for choices in itertools.product("yna-", repeat=rest):
        tally = Tally(yes=Decimal(yes + choices.count("y")), no=Decimal(no + choices.count("n")),
                      abstain=Decimal(abstain + choices.count("a")), votes=0, quorum=Decimal(quorum),
                      threshold=Decimal(threshold))
        results.add(tally.succeeds)
    return results


@pytest.mark.parametrize("threshold", ["0", "0.5", "0.6667", "1"])
@pytest.mark.parametrize("quorum", [0, 2, 4])
def test_settled_agrees_with_trying_every_way_the_rest_could_vote(quorum, threshold):
    for yes, no, abstain, rest in itertools.product(range(4), range(4), range(2), range(4)):
        tally = Tally(yes=Decimal(yes), no=Decimal(no), abstain=Decimal(abstain), votes=0,
                      quorum=Decimal(quorum), threshold=Decimal(threshold))
        assert tally.settled(remaining=Decimal(rest)) == (len(_outcomes(yes, no, abstain, rest, quorum, threshold)) == 1), (
            yes, no, abstain, rest)


@override_settings(AGORA_QUORUM_MIN=3, AGORA_QUORUM_FRACTION=0, AGORA_PASS_THRESHOLD=0.5)
def test_votes_cast_by_a_delegate_do_not_close_a_vote_early_since_their_members_may_still_override_them():
    author, delegate, *delegators = UserFactory.create_batch(5)
    for member in delegators[:2]:
        services.delegation_set(delegator=member, delegate=delegate)
    proposal = services.proposal_submit(author=author, kind="training", title="Delegated", spec={}, open_now=True)
    services.vote_cast(proposal=proposal, voter=delegate, choice="yes")
    proposal.refresh_from_db()
    # 3 yes (one direct, two through the delegate) of 5 would look settled, but the two delegators may still
    # vote no themselves: 1 yes against up to 4 no is not decided.
    assert proposal.status == "active"
    assert services.proposal_tally(proposal=proposal).yes == 3
    services.vote_cast(proposal=proposal, voter=delegators[0], choice="no")
    services.vote_cast(proposal=proposal, voter=delegators[1], choice="no")
    services.vote_cast(proposal=proposal, voter=delegators[2], choice="no")
    proposal.refresh_from_db()
    # 1 yes, 3 no of 5: settled as a defeat however the author votes.
    assert proposal.status == "defeated" and proposal.close_reason == "decided"
