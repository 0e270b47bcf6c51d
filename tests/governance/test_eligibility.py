"""Sybil-resistant voting: who may vote (AGORA_VOTER_ELIGIBILITY), what an ineligible member is told, and
a quorum that is a fraction of the eligible voters, frozen when the vote opens."""

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings
from django.utils import timezone
from rest_framework.test import APIClient

from governance import services
from governance.eligibility import eligible_voters, parse_rule, quorum_for, voter_eligibility
from governance.errors import NotAllowed, NotEligible
from governance.models import Proposal, Vote, VoterApproval
from governance.selectors import proposal_tally
from ledger.models import Entry
from ledger.selectors import ledger_verify
from marketplace.services import credit_grant
from tests.factories import UserFactory
from tests.governance.factories import ProposalFactory
from tests.marketplace.factories import WorkerFactory

pytestmark = pytest.mark.django_db
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def fresh(**kwargs):
    """An account made a moment ago (verified unless told otherwise)."""
    return UserFactory(date_joined=timezone.now() - timedelta(minutes=5), **kwargs)


def with_credits(user, amount):
    worker = WorkerFactory(owner=user)
    credit_grant(worker=worker, amount=Decimal(amount), reason="accepted update", reference=f"task:{worker.pk}")
    return user


# --- the rule -----------------------------------------------------------------------------------

def test_a_verified_email_is_always_required():
    assert str(parse_rule("account_age:7d")) == "verified_email,account_age:7d"
    assert str(parse_rule("")) == "verified_email"
    assert str(parse_rule("verified_email, credits:10 | staff_approved")) == "verified_email,credits:10|staff_approved"


@pytest.mark.parametrize("rule", ["account_age:7", "account_age:7w", "credits:", "credits:-1", "karma:3",
                                  "staff_approved:1", "verified_email:yes"])
def test_a_rule_that_is_not_understood_is_refused(rule):
    with pytest.raises(ImproperlyConfigured, match="AGORA_VOTER_ELIGIBILITY"):
        parse_rule(rule)


def test_the_server_refuses_to_start_with_a_rule_it_does_not_understand(tmp_path):
    env = {**os.environ, "AGORA_VOTER_ELIGIBILITY": "verified_email,karma:3", "AGORA_VAR_DIR": str(tmp_path),
           "DJANGO_SECRET_KEY": "test", "DJANGO_SETTINGS_MODULE": "agora.settings"}
    done = subprocess.run([sys.executable, "-c", "import django; django.setup()"], env=env,
                          capture_output=True, text=True)
    assert done.returncode != 0 and "karma:3" in done.stderr


@pytest.mark.parametrize("eligible, fraction, minimum, quorum", [
    (0, 0.1, 3, 3), (29, 0.1, 3, 3), (31, 0.1, 3, 4), (1000, 0.1, 3, 100), (10, 0.5, 0, 5), (3, 1, 0, 3),
])
def test_quorum_is_a_fraction_of_eligible_voters_with_a_minimum(settings, eligible, fraction, minimum, quorum):
    settings.AGORA_QUORUM_FRACTION, settings.AGORA_QUORUM_MIN = fraction, minimum
    assert quorum_for(eligible=eligible) == quorum


RULES = [
    "verified_email",
    "verified_email,account_age:7d",
    "account_age:30d|staff_approved",
    "credits:10",
    "credits:10|staff_approved,account_age:1h",
    "staff_approved",
]


@pytest.mark.parametrize("rule", RULES)
def test_the_check_on_one_member_agrees_with_the_count_of_all(rule, staff):
    unverified = UserFactory(verified=False)
    no_email = UserFactory(email="")
    new = fresh()
    approved = fresh()
    VoterApproval.objects.create(user=approved, approved_by=staff)
    rich = with_credits(UserFactory(), 25)
    poor = with_credits(fresh(), 3)
    inactive = UserFactory(is_active=False)
    plain = UserFactory()
    everyone = [unverified, no_email, new, approved, rich, poor, inactive, plain, staff]
    by_check = {u.pk for u in everyone if voter_eligibility(u, rule=rule).eligible}
    assert set(eligible_voters(rule=rule).values_list("pk", flat=True)) == by_check
    assert unverified.pk not in by_check and no_email.pk not in by_check and inactive.pk not in by_check


def test_an_ineligible_member_is_told_everything_that_is_missing():
    member = with_credits(fresh(verified=False), 2)
    result = voter_eligibility(member, rule="account_age:7d,credits:10|staff_approved")
    assert not result.eligible and result.basis == {}
    assert result.missing == (
        "a verified e-mail address (use the link we sent, or send another)",
        "an account at least 7 days old when the vote opened (yours was newer than a day)",
        "either at least 10 verified compute credits (you have 2) or approval as a voting member by staff",
    )


def test_the_basis_records_what_made_a_member_eligible(staff):
    member = with_credits(UserFactory(), Decimal("12.5"))
    result = voter_eligibility(member, rule="credits:10|staff_approved", at=member.date_joined + timedelta(days=3))
    assert result.eligible
    assert result.as_ledger() == {"rule": "verified_email,credits:10|staff_approved", "verified_email": True,
                                  "credits": 12.5}
    VoterApproval.objects.create(user=member, approved_by=staff)
    assert voter_eligibility(member, rule="credits:10|staff_approved").basis["staff_approved"] is True


# --- voting -------------------------------------------------------------------------------------

ROLES = ["anonymous", "unverified", "too_new", "eligible", "staff"]
STATES = ["draft", "active", "succeeded", "defeated", "approved", "vetoed", "enacted", "canceled"]


def user_for(role):
    return {
        "anonymous": lambda: None,
        "unverified": lambda: UserFactory(verified=False),
        "too_new": lambda: fresh(),
        "eligible": lambda: UserFactory(),
        "staff": lambda: UserFactory(is_staff=True),
    }[role]()


def expected(role, state):
    if role == "anonymous":
        return 401, "not_authenticated"
    if state != "active":
        return 409, "invalid_state"
    if role in ("unverified", "too_new"):
        return 403, "not_eligible"
    return 200, None


@override_settings(AGORA_VOTER_ELIGIBILITY="verified_email,account_age:7d")
@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("role", ROLES)
@override_settings(AGORA_EARLY_CLOSE=False)  # the vote stays open whoever has voted
def test_vote_role_by_eligibility_by_state(role, state):
    proposal = ProposalFactory(status=state)
    user = user_for(role)
    client = APIClient()
    if user is not None:
        client.force_authenticate(user)
    entries = Entry.objects.count()
    response = client.post(f"/api/v1/proposals/{proposal.pk}/vote", {"choice": "yes"}, format="json")
    status, code = expected(role, state)
    assert response.status_code == status, response.content
    if status == 200:
        assert Vote.objects.get(proposal=proposal).voter == user
        assert Entry.objects.count() == entries + 1
    else:
        assert response.json()["error"] == code
        assert not Vote.objects.exists() and Entry.objects.count() == entries


def test_the_refusal_names_what_is_missing(api_client):
    proposal = ProposalFactory(status="active")
    api_client.force_authenticate(fresh(verified=False))
    body = api_client.post(f"/api/v1/proposals/{proposal.pk}/vote", {"choice": "no"}, format="json").json()
    assert body["error"] == "not_eligible"
    assert "verified e-mail address" in body["detail"] and "7 days old" in body["detail"]


def test_the_vote_panel_says_what_an_ineligible_member_needs_and_offers_no_buttons(client):
    proposal = ProposalFactory(status="active")
    client.force_login(UserFactory(verified=False))
    page = client.get(proposal.get_absolute_url()).content.decode()
    assert 'id="vote-eligibility"' in page and "verified e-mail address" in page
    assert "/accounts/email/" in page and 'name="choice"' not in page
    client.force_login(UserFactory())
    page = client.get(proposal.get_absolute_url()).content.decode()
    assert 'id="vote-eligibility"' not in page and 'name="choice"' in page


def test_voting_through_the_page_as_an_ineligible_member_records_nothing(client):
    proposal = ProposalFactory(status="active")
    client.force_login(fresh())
    response = client.post(f"/proposals/{proposal.pk}/vote", {"choice": "yes"}, HTTP_HX_REQUEST="true")
    assert response.status_code == 200 and "7 days old" in response.content.decode()
    assert not Vote.objects.exists()


@override_settings(AGORA_EARLY_CLOSE=False)  # the vote stays open whoever has voted
def test_each_vote_entry_records_its_eligibility_basis(member, staff, settings):
    settings.AGORA_VOTER_ELIGIBILITY = "account_age:7d,credits:10|staff_approved"
    with_credits(member, 40)
    services.voter_approval_grant(user=staff, by=staff)
    proposal = services.proposal_submit(author=member, kind="training", title="Run it", spec={}, open_now=True)
    services.vote_cast(proposal=proposal, voter=member, choice="yes")
    services.vote_cast(proposal=proposal, voter=staff, choice="no")
    services.vote_cast(proposal=proposal, voter=staff, choice="abstain")
    votes = [e.payload for e in Entry.objects.filter(action__startswith="vote.").order_by("seq")]
    days = (proposal.opens_at - member.date_joined).days
    rule = "verified_email,account_age:7d,credits:10|staff_approved"
    assert [v["eligibility"] for v in votes] == [
        {"rule": rule, "verified_email": True, "account_age_days": days, "credits": 40},
        {"rule": rule, "verified_email": True, "account_age_days": days, "staff_approved": True},
        {"rule": rule, "verified_email": True, "account_age_days": days, "staff_approved": True},
    ]
    assert ledger_verify().ok


# --- quorum and Sybils --------------------------------------------------------------------------

@override_settings(AGORA_QUORUM_FRACTION=0.5, AGORA_QUORUM_MIN=2, AGORA_PASS_THRESHOLD=0.5,
                   AGORA_VOTER_ELIGIBILITY="verified_email,account_age:7d", AGORA_VOTING_PERIOD=timedelta(days=3))
def test_sock_puppets_cannot_vote_and_do_not_count_toward_quorum():
    author, *honest = UserFactory.create_batch(6)
    with time_machine.travel(NOW, tick=False) as clock:
        # Forty accounts made minutes before the vote, half with verified addresses, none old enough.
        puppets = [fresh(verified=n % 2 == 0) for n in range(40)]
        proposal = services.proposal_submit(author=author, kind="training", title="Pass me", spec={}, open_now=True)
        assert proposal.eligible_voters == 6 and proposal.quorum == 3  # 0.5 × 6, not 0.5 × 46
        for puppet in puppets:
            with pytest.raises(NotEligible):
                services.vote_cast(proposal=proposal, voter=puppet, choice="yes")
        services.vote_cast(proposal=proposal, voter=honest[0], choice="no")
        services.vote_cast(proposal=proposal, voter=honest[1], choice="yes")
        tally = proposal_tally(proposal=proposal)
        assert tally.votes == 2 and not tally.quorum_reached
        clock.move_to(NOW + timedelta(days=3))
        closed = services.proposal_close(proposal_id=proposal.pk)
    assert closed.status == Proposal.Status.DEFEATED
    opened = Entry.objects.get(action="proposal.opened")
    assert opened.payload["eligible_voters"] == 6 and opened.payload["quorum"] == 3
    assert opened.payload["eligibility_rule"] == "verified_email,account_age:7d"


@override_settings(AGORA_QUORUM_FRACTION=0.5, AGORA_QUORUM_MIN=1, AGORA_VOTING_PERIOD=timedelta(days=10),
                   AGORA_VOTER_ELIGIBILITY="account_age:7d")
def test_accounts_made_after_the_vote_opened_never_vote_on_it_and_the_rule_is_frozen():
    author = UserFactory()
    with time_machine.travel(NOW, tick=False) as clock:
        proposal = services.proposal_submit(author=author, kind="training", title="Frozen", spec={}, open_now=True)
        assert (proposal.eligible_voters, proposal.quorum) == (1, 1)
        clock.move_to(NOW + timedelta(hours=1))
        latecomer = UserFactory(date_joined=timezone.now())
        clock.move_to(NOW + timedelta(days=8))  # the latecomer is now 8 days old, but was not when it opened
        assert voter_eligibility(latecomer).eligible
        with pytest.raises(NotEligible, match="when the vote opened"):
            services.vote_cast(proposal=proposal, voter=latecomer, choice="yes")
        # A stricter rule set afterwards does not apply to a vote already open.
        with override_settings(AGORA_VOTER_ELIGIBILITY="staff_approved"):
            services.vote_cast(proposal=proposal, voter=author, choice="yes")
            proposal.refresh_from_db()
            assert (proposal.eligible_voters, proposal.quorum) == (1, 1)


def test_api_shows_the_frozen_eligible_count(api_client, member):
    proposal = services.proposal_submit(author=member, kind="training", title="Count", spec={}, open_now=True)
    body = api_client.get(f"/api/v1/proposals/{proposal.pk}/").json()
    assert body["eligible_voters"] == proposal.eligible_voters >= 1
    assert body["eligibility_rule"].startswith("verified_email")


# --- staff-approved membership ------------------------------------------------------------------

@override_settings(AGORA_VOTER_ELIGIBILITY="staff_approved")
@override_settings(AGORA_EARLY_CLOSE=False)  # the vote stays open whoever has voted
def test_staff_approve_and_withdraw_membership_in_the_ledger(staff, member):
    proposal = ProposalFactory(status="active")
    with pytest.raises(NotEligible, match="approval as a voting member by staff"):
        services.vote_cast(proposal=proposal, voter=member, choice="yes")
    with pytest.raises(NotAllowed):
        services.voter_approval_grant(user=member, by=UserFactory())
    services.voter_approval_grant(user=member, by=staff, note="Met at the meetup.")
    services.voter_approval_grant(user=member, by=staff)  # again: nothing new
    services.vote_cast(proposal=proposal, voter=member, choice="yes")
    assert services.voter_approval_revoke(user=member, by=staff, reason="Duplicate account.")
    with pytest.raises(NotEligible):
        services.vote_cast(proposal=proposal, voter=member, choice="no")
    assert list(Entry.objects.filter(subject=f"user:{member.pk}").values_list("action", flat=True)) == [
        "member.approved", "member.approval_revoked"]


def test_staff_approve_a_member_in_the_admin(client, member):
    admin_user = UserFactory(is_staff=True, is_superuser=True)
    client.force_login(admin_user)
    response = client.post("/admin/governance/voterapproval/add/", {"user": member.pk, "note": "known"})
    assert response.status_code == 302, response.content[-2000:]
    approval = VoterApproval.objects.get(user=member)
    assert approval.approved_by == admin_user
    assert Entry.objects.filter(action="member.approved", subject=f"user:{member.pk}").exists()
    client.post("/admin/governance/voterapproval/", {"action": "revoke_selected", "_selected_action": [approval.pk]})
    assert not VoterApproval.objects.exists()
    assert Entry.objects.filter(action="member.approval_revoked").count() == 1
