"""The proposal lifecycle end to end through the services and the beat task, with frozen time."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine
from django.test import override_settings

from governance import services
from governance.errors import NotAllowed, ProposalStateError, VotingClosed
from governance.models import Guardrail, Proposal
from governance.selectors import (
    Tally,
    guardrails_active,
    home_summary,
    member_activity,
    proposal_tally,
    training_proposals_to_enact,
)
from governance.signals import training_proposal_approved
from governance.tasks import close_due_proposals
from ledger.models import Entry
from ledger.selectors import ledger_verify
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db
START = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def actions(subject: str) -> list[str]:
    return list(Entry.objects.filter(subject=subject).order_by("seq").values_list("action", flat=True))


def submit(author, kind="training", spec=None, **kwargs) -> Proposal:
    return services.proposal_submit(author=author, kind=kind, title="Train the small model", body="Why not.",
                                    spec=spec if spec is not None else {}, **kwargs)


@override_settings(AGORA_QUORUM_MIN=3, AGORA_PASS_THRESHOLD=0.5, AGORA_VOTING_PERIOD=timedelta(days=3))
def test_training_proposal_from_draft_to_enacted_with_frozen_time(
    member, staff, django_capture_on_commit_callbacks, monkeypatch
):
    # Only this test's receiver listens (training's would enqueue its pickup task).
    monkeypatch.setattr(training_proposal_approved, "receivers", [])
    voters = UserFactory.create_batch(3)
    with time_machine.travel(START, tick=False) as clock:
        proposal = submit(member)
        assert proposal.status == Proposal.Status.DRAFT and proposal.opens_at is None
        services.proposal_open(proposal=proposal, by=member)
        assert (proposal.opens_at, proposal.closes_at) == (START, START + timedelta(days=3))
        assert (proposal.quorum, proposal.threshold) == (Decimal(3), Decimal("0.5"))

        # The window is frozen: changing the settings later does not move it.
        with override_settings(AGORA_VOTING_PERIOD=timedelta(hours=1), AGORA_QUORUM_MIN=99):
            proposal.refresh_from_db()
            assert proposal.closes_at == START + timedelta(days=3) and proposal.quorum == 3

        for voter, choice in zip(voters, ["yes", "yes", "no"], strict=True):
            services.vote_cast(proposal=proposal, voter=voter, choice=choice)

        clock.move_to(START + timedelta(days=3) - timedelta(seconds=1))
        assert close_due_proposals() == []
        proposal.refresh_from_db()
        assert proposal.status == Proposal.Status.ACTIVE

        clock.move_to(START + timedelta(days=3))
        with pytest.raises(VotingClosed):
            services.vote_cast(proposal=proposal, voter=member, choice="no")
        assert close_due_proposals() == [proposal.pk]
        proposal.refresh_from_db()
        assert proposal.status == Proposal.Status.SUCCEEDED
        assert proposal.closed_at == START + timedelta(days=3)

        received = []

        def receiver(sender, proposal_id, **kwargs):
            received.append(proposal_id)

        training_proposal_approved.connect(receiver, dispatch_uid="test-receiver")
        try:
            with django_capture_on_commit_callbacks(execute=True):
                services.proposal_approve(proposal=proposal, by=staff)
                assert received == []  # only once the transaction commits
        finally:
            training_proposal_approved.disconnect(dispatch_uid="test-receiver")
        assert received == [proposal.pk]
        assert list(training_proposals_to_enact()) == [proposal]

        services.proposal_enact(proposal=proposal, outcome={"run_id": 4})
        proposal.refresh_from_db()
        assert proposal.status == Proposal.Status.ENACTED and proposal.outcome == {"run_id": 4}
        with pytest.raises(ProposalStateError):
            services.proposal_enact(proposal=proposal, outcome={"run_id": 5})

    assert actions(proposal.ledger_subject) == [
        "proposal.submitted", "proposal.opened", "vote.cast", "vote.cast", "vote.cast",
        "proposal.closed", "proposal.approved", "proposal.enacted",
    ]
    closed = Entry.objects.get(subject=proposal.ledger_subject, action="proposal.closed")
    assert closed.payload["outcome"] == "succeeded"
    assert closed.payload["tally"]["yes"] == 2 and closed.payload["tally"]["no"] == 1
    enacted = Entry.objects.get(subject=proposal.ledger_subject, action="proposal.enacted")
    assert enacted.payload == {"outcome": {"run_id": 4}}
    assert ledger_verify().ok


def test_closing_twice_changes_nothing_the_second_time(member):
    with time_machine.travel(START, tick=False) as clock:
        proposal = submit(member, open_now=True)
        clock.move_to(proposal.closes_at + timedelta(minutes=1))
        assert close_due_proposals() == [proposal.pk]
        count = Entry.objects.count()
        assert close_due_proposals() == []
        assert services.proposal_close(proposal_id=proposal.pk).status == Proposal.Status.DEFEATED
        assert Entry.objects.count() == count
        assert actions(proposal.ledger_subject).count("proposal.closed") == 1


@override_settings(AGORA_EARLY_CLOSE=False)  # the vote stays open whoever has voted
def test_closing_before_the_window_ends_is_refused(member):
    proposal = submit(member, open_now=True)
    with pytest.raises(ProposalStateError):
        services.proposal_close(proposal_id=proposal.pk)
    proposal.refresh_from_db()
    assert proposal.status == Proposal.Status.ACTIVE


def test_nobody_votes_before_a_draft_opens_or_after_it_is_decided(member, other_member):
    proposal = submit(member)
    with pytest.raises(ProposalStateError):
        services.vote_cast(proposal=proposal, voter=other_member, choice="yes")
    assert not proposal.votes.exists()


D = Decimal


@pytest.mark.parametrize(
    ("yes", "no", "abstain", "quorum", "threshold", "quorum_reached", "succeeds"),
    [
        (D(2), D(0), D(0), D(3), D("0.5"), False, False),  # one short of quorum, all yes
        (D(2), D(0), D(1), D(3), D("0.5"), True, True),  # abstentions count towards quorum
        (D(0), D(0), D(3), D(3), D("0.5"), True, False),  # quorum but nobody decided: not passed
        (D(2), D(2), D(0), D(3), D("0.5"), True, False),  # exactly at the threshold is not above it
        (D(3), D(2), D(0), D(3), D("0.5"), True, True),
        (D(2), D(1), D(0), D(3), D("0.6667"), True, False),  # 0.66666… is below 0.6667
        (D(2), D(1), D(0), D(3), D("0.6666"), True, True),
        (D("2.5"), D("0.5"), D(0), D(3), D("0.5"), True, True),  # fractional weights
        (D("2.9999"), D(0), D(0), D(3), D("0.5"), False, False),
        (D(1), D(0), D(0), D(0), D(0), True, True),
        (D(0), D(1), D(0), D(0), D(0), True, False),
    ],
)
def test_quorum_and_threshold_edges(yes, no, abstain, quorum, threshold, quorum_reached, succeeds):
    tally = Tally(yes=yes, no=no, abstain=abstain, votes=3, quorum=quorum, threshold=threshold)
    assert tally.quorum_reached is quorum_reached
    assert tally.succeeds is succeeds


@override_settings(AGORA_QUORUM_MIN=2, AGORA_PASS_THRESHOLD=0.5)
def test_defeat_by_missing_quorum_is_recorded(member, other_member):
    with time_machine.travel(START, tick=False) as clock:
        proposal = submit(member, open_now=True)
        services.vote_cast(proposal=proposal, voter=other_member, choice="yes")
        clock.move_to(proposal.closes_at)
        close_due_proposals()
    proposal.refresh_from_db()
    assert proposal.status == Proposal.Status.DEFEATED
    closed = Entry.objects.get(subject=proposal.ledger_subject, action="proposal.closed")
    assert closed.payload["tally"]["quorum_reached"] is False and closed.payload["outcome"] == "defeated"


@override_settings(AGORA_QUORUM_MIN=2)
def test_guardrail_adopted_then_retired_by_another_proposal(member, other_member):
    with time_machine.travel(START, tick=False) as clock:
        adopt = submit(member, kind="guardrail", open_now=True, spec={
            "kind": "data_filter", "patterns": [r"\bapi[_-]?key\b", r"\bapi[_-]?key\b"], "description": "Keys."})
        assert adopt.spec["patterns"] == [r"\bapi[_-]?key\b"]  # normalised: duplicates dropped
        for voter in (member, other_member):
            services.vote_cast(proposal=adopt, voter=voter, choice="yes")
        clock.move_to(adopt.closes_at)
        close_due_proposals()
        adopt.refresh_from_db()
        assert adopt.status == Proposal.Status.ENACTED  # no approval needed
        guardrail = Guardrail.objects.get(proposal=adopt)
        assert guardrails_active() == [{"id": guardrail.pk, "title": adopt.title, "kind": "data_filter",
                                        "patterns": [r"\bapi[_-]?key\b"], "description": "Keys."}]
        assert guardrails_active(kind="output_filter") == []
        assert home_summary()["active_guardrails"] == 1

        retire = submit(other_member, kind="guardrail", open_now=True,
                        spec={"action": "retire", "guardrail_id": guardrail.pk})
        for voter in (member, other_member):
            services.vote_cast(proposal=retire, voter=voter, choice="yes")
        clock.move_to(retire.closes_at)
        close_due_proposals()
    guardrail.refresh_from_db()
    assert not guardrail.active and guardrail.retired_by_id == retire.pk
    assert guardrails_active() == []
    assert "guardrail.enacted" in actions(f"guardrail:{guardrail.pk}")
    assert "guardrail.retired" in actions(f"guardrail:{guardrail.pk}")
    assert actions(retire.ledger_subject)[-2:] == ["proposal.closed", "proposal.enacted"]
    assert ledger_verify().ok


def test_retiring_a_guardrail_that_is_not_in_force_is_a_field_error(member):
    from rest_framework.exceptions import ValidationError

    with pytest.raises(ValidationError) as err:
        submit(member, kind="guardrail", spec={"action": "retire", "guardrail_id": 999})
    assert "guardrail_id" in err.value.detail["spec"]
    assert not Proposal.objects.exists()


def test_guardrail_proposals_need_no_approval_and_cannot_be_approved(member, staff):
    from tests.governance.factories import ProposalFactory

    proposal = ProposalFactory(kind="guardrail", status="succeeded")
    with pytest.raises(ProposalStateError):
        services.proposal_approve(proposal=proposal, by=staff)


def test_cancel_only_before_the_first_vote(member, other_member):
    proposal = submit(member, open_now=True)
    services.vote_cast(proposal=proposal, voter=other_member, choice="no")
    with pytest.raises(ProposalStateError):
        services.proposal_cancel(proposal=proposal, by=member)
    draft = submit(member)
    with pytest.raises(NotAllowed):
        services.proposal_cancel(proposal=draft, by=other_member)
    services.proposal_cancel(proposal=draft, by=member)
    assert draft.status == Proposal.Status.CANCELED
    assert actions(draft.ledger_subject) == ["proposal.submitted", "proposal.canceled"]


def test_veto_needs_a_reason_and_is_terminal(staff):
    from rest_framework.exceptions import ValidationError

    from tests.governance.factories import ProposalFactory

    proposal = ProposalFactory(status="succeeded")
    with pytest.raises(ValidationError):
        services.proposal_veto(proposal=proposal, by=staff, reason="   ")
    services.proposal_veto(proposal=proposal, by=staff, reason="Dataset licence unclear.")
    assert proposal.status == Proposal.Status.VETOED
    for attempt in (lambda: services.proposal_approve(proposal=proposal, by=staff),
                    lambda: services.proposal_enact(proposal=proposal, outcome={})):
        with pytest.raises(ProposalStateError):
            attempt()
    entry = Entry.objects.get(subject=proposal.ledger_subject, action="proposal.vetoed")
    assert entry.payload == {"reason": "Dataset licence unclear."} and entry.actor == staff.username


@override_settings(AGORA_EARLY_CLOSE=False)  # the vote stays open whoever has voted
def test_member_activity_and_home_summary(member, other_member):
    proposal = submit(member, open_now=True)
    services.vote_cast(proposal=proposal, voter=member, choice="yes")
    services.vote_cast(proposal=proposal, voter=other_member, choice="no")
    activity = member_activity(user=member)
    assert activity["proposals"] == [proposal] and activity["votes_cast"] == 1
    assert home_summary()["active_proposals"] == 1
    assert proposal_tally(proposal=proposal).as_dict()["votes"] == 2
