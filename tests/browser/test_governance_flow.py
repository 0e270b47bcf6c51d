"""A member proposes and votes in a real Chromium; staff approves. Drives the pages, not the API."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest
import time_machine
from django.conf import settings

from governance import services
from governance.models import Guardrail, Proposal
from governance.tasks import close_due_proposals
from ledger.selectors import ledger_verify
from tests.browser.pages import log_in, new_page, shoot
from tests.factories import UserFactory

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_member_proposes_and_votes_then_staff_approves(browser, live_server, monkeypatch, tmp_path):
    # Playwright's sync API runs an event loop in this thread; Django's ORM calls from the test are still sync.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    # Approval enqueues training's pickup task; on the embedded default that is a file in the queue folder.
    (Path(settings.VAR_DIR) / "celery" / "queue").mkdir(parents=True, exist_ok=True)
    member = UserFactory(username="ada")
    staff = UserFactory(username="grace", is_staff=True)
    others = UserFactory.create_batch(3)

    page = log_in(browser, live_server.url, member.username)
    assert page.locator("summary", has_text="ada").count() == 1

    # A guardrail through the form: one pattern per line.
    page.goto("/proposals/new/?kind=guardrail")
    page.fill("#id_title", "Keep API keys out of training data")
    page.select_option("#id_guardrail_kind", "data_filter")
    page.fill("#id_patterns", "api[_-]?key\\s*=\nsk-[a-z0-9]{20,}")
    page.fill("#id_description", "Documents with credentials are dropped.")
    page.click("#proposal-form button[type=submit]")
    page.wait_for_url("**/proposals/*/")
    guardrail_proposal = Proposal.objects.get(kind="guardrail")
    assert guardrail_proposal.status == "active"  # the form opens the vote by default
    assert guardrail_proposal.spec["patterns"] == ["api[_-]?key\\s*=", "sk-[a-z0-9]{20,}"]

    # A training run: the spec's fields are separate inputs with defaults.
    page.goto("/proposals/new/?kind=training")
    assert page.input_value("#id_inner_lr") == "0.0004"
    page.fill("#id_title", "Train byte-gpt-small on the Python docs")
    page.fill("#id_body", "Three rounds, **two** workers.")
    page.fill("#id_rounds", "2")
    page.click("#proposal-form button[type=submit]")
    page.wait_for_url("**/proposals/*/")
    training = Proposal.objects.get(kind="training")
    assert training.spec["diloco"]["rounds"] == 2
    page.screenshot(path=str(tmp_path / "proposal.png"), full_page=True)

    # Voting swaps the tally panel in place: a marker on window survives, so the page did not reload.
    page.evaluate("window.__agoraMarker = 'still-here'")
    assert page.locator('[data-tally="yes"]').inner_text() == "0"
    page.click("#vote-panel button[value=yes]")
    page.locator('[data-tally="yes"]', has_text="1").wait_for()
    assert page.locator("[data-my-vote]").inner_text() == "yes"
    assert page.evaluate("window.__agoraMarker") == "still-here"
    shoot(page, "governance-voted")

    # Ada's yes and two more of the five members settle both votes (3 of 5 yes, quorum 3): they close at once,
    # without waiting out the window; the third member is too late.
    for voter in others[:2]:
        services.vote_cast(proposal=training, voter=voter, choice="yes")
        services.vote_cast(proposal=guardrail_proposal, voter=voter, choice="yes")
    services.vote_cast(proposal=guardrail_proposal, voter=member, choice="yes")
    training.refresh_from_db()
    assert training.status == "succeeded" and training.close_reason == "decided"
    with time_machine.travel(training.closes_at + timedelta(seconds=1), tick=False):
        assert close_due_proposals() == []  # closing is idempotent: nothing is left to close
    assert Guardrail.objects.get(proposal=guardrail_proposal).active

    admin_page = log_in(browser, live_server.url, staff.username)
    admin_page.goto(f"/proposals/{training.pk}/")
    admin_page.click("#approve-button")
    admin_page.wait_for_load_state()
    assert admin_page.locator("#proposal-status").inner_text() == "Approved"
    shoot(admin_page, "governance-approved")
    training.refresh_from_db()
    assert training.status == "approved" and training.decided_by == staff

    admin_page.goto("/guardrails/")
    assert admin_page.locator("text=Keep API keys out of training data").count() == 1
    admin_page.goto("/ledger/")
    ledger_text = admin_page.locator("main").inner_text()
    for action in ("proposal.submitted", "vote.cast", "proposal.closed", "guardrail.enacted", "proposal.approved"):
        assert action in ledger_text
    admin_page.screenshot(path=str(tmp_path / "ledger.png"), full_page=True)
    assert ledger_verify().ok


def test_a_new_member_signs_up_verifies_the_address_and_then_may_vote(browser, live_server, monkeypatch, settings):
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    settings.AGORA_VOTER_ELIGIBILITY = "verified_email"  # no account age, so the new member can vote today
    from django.core import mail

    proposal = services.proposal_submit(author=UserFactory(), kind="training", title="Vote on me", spec={},
                                        open_now=True)
    page = new_page(browser, live_server.url)
    page.goto("/accounts/signup/")
    page.fill("input[name=username]", "newcomer")
    page.fill("input[name=email]", "newcomer@example.org")
    page.fill("input[name=password1]", "a-long pass phrase")
    page.fill("input[name=password2]", "a-long pass phrase")
    page.click("form button[type=submit]")
    page.wait_for_load_state()
    assert page.locator("summary", has_text="newcomer").count() == 1

    # Not verified yet: the vote panel says what is missing and offers no buttons.
    page.goto(f"/proposals/{proposal.pk}/")
    assert "a verified e-mail address" in page.locator("#vote-eligibility").inner_text()
    assert page.locator("#vote-panel button[value=yes]").count() == 0

    link = re.search(r"https?://\S+/accounts/confirm-email/\S+/", mail.outbox[-1].body).group(0)
    page.goto(link)
    page.click("main form button[type=submit]")
    page.wait_for_load_state()

    page.goto(f"/proposals/{proposal.pk}/")
    page.click("#vote-panel button[value=yes]")
    page.locator('[data-tally="yes"]', has_text="1").wait_for()
    vote = proposal.votes.get()
    assert vote.voter.username == "newcomer" and vote.choice == "yes"
