"""A newcomer's governance journey in Chromium: sign up, verify the e-mail, delegate, get notified, see the
delegate's vote count for them, override it with their own vote (which settles the outcome: the vote closes
early in place), hear that staff approved, and, once volunteers have trained the run, follow the "run
finished" notification to the run page: its summary and a sample of each round's text. Screenshots at 1280
and 390 pixels wide."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from rest_framework.test import APIRequestFactory

from governance import services
from governance.models import Notification, Proposal, Vote
from tests.browser.pages import log_in, new_page, screenshot_dir, shoot
from tests.factories import UserFactory
from tests.marketplace.factories import WorkerFactory
from tests.training.factories import tiny_spec, train_update
from training import services as training
from training.models import TrainingRun
from training.serializers import task_payload

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def bell_count(page) -> int:
    badge = page.locator("#bell-count")
    return int(badge.inner_text()) if badge.count() else 0


def test_newcomer_delegates_is_notified_votes_sees_the_early_close_and_the_finished_run(browser, live_server, monkeypatch, settings):
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    (Path(settings.VAR_DIR) / "celery" / "queue").mkdir(parents=True, exist_ok=True)
    settings.AGORA_VOTER_ELIGIBILITY = "verified_email"
    settings.AGORA_QUORUM_MIN, settings.AGORA_QUORUM_FRACTION, settings.AGORA_PASS_THRESHOLD = 3, 0, 0.5
    from django.core import mail

    grace = UserFactory(username="grace", is_staff=True)
    alice, bob, carol = (UserFactory(username=name) for name in ("alice", "bob", "carol"))

    # Sign up and verify the address from the e-mail.
    page = new_page(browser, live_server.url)
    page.goto("/accounts/signup/")
    page.fill("input[name=username]", "newcomer")
    page.fill("input[name=email]", "newcomer@example.org")
    page.fill("input[name=password1]", "a-long pass phrase")
    page.fill("input[name=password2]", "a-long pass phrase")
    page.click("form button[type=submit]")
    page.wait_for_load_state()
    link = re.search(r"https?://\S+/accounts/confirm-email/\S+/", mail.outbox[-1].body).group(0)
    page.goto(link)
    page.click("main form button[type=submit]")
    page.wait_for_load_state()

    # Delegate training proposals to bob, on the delegations page.
    page.goto("/delegations/")
    page.fill("#id_delegate", "bob")
    page.select_option("#id_kind", "training")
    page.click("#delegation-form button[type=submit]")
    page.wait_for_load_state()
    assert "bob" in page.locator("#my-delegations").inner_text()
    shoot(page, "community-delegations")
    newcomer = UserFactory._meta.model.objects.get(username="newcomer")
    assert Notification.objects.filter(user=bob, kind="delegation").exists()

    # Alice opens a vote: the newcomer is told in the app.
    spec = tiny_spec(diloco={"rounds": 2, "workers_per_round": 1, "min_workers": 1})
    proposal = services.proposal_submit(author=alice, kind="training", title="Train on the Python docs", spec=spec,
                                        body="Two rounds on the built-in corpus.", open_now=True)
    page.goto("/")
    assert bell_count(page) == 1
    assert "Train on the Python docs" in page.locator("#needs-me").inner_text()
    shoot(page, "community-home")
    page.click("#bell")
    page.wait_for_url("**/notifications/")
    shoot(page, "community-notifications")
    page.click("#notification-list button")
    page.wait_for_url(f"**/proposals/{proposal.pk}/")
    assert bell_count(page) == 0
    services.comment_post(proposal=proposal, author=alice, body="@newcomer, what do you think?")

    # bob votes no, carol and alice yes: bob's no counts for the newcomer too (2 yes, 2 no, grace left).
    services.vote_cast(proposal=proposal, voter=bob, choice="no")
    services.vote_cast(proposal=proposal, voter=carol, choice="yes")
    services.vote_cast(proposal=proposal, voter=alice, choice="yes")
    page.reload()
    assert "via bob" in page.locator('#votes-list tr[data-voter="newcomer"]').inner_text()
    assert "You delegated training run proposals to bob" in page.locator("#delegation-note").inner_text()
    proposal.refresh_from_db()
    assert proposal.status == "active"

    # The newcomer's own yes overrides bob's and settles it: 3 yes of 5 whatever grace does.
    page.evaluate("window.__agoraMarker = 'still-here'")
    page.click("#vote-panel button[value=yes]")
    page.locator("#proposal-status", has_text="Succeeded").wait_for()
    assert page.evaluate("window.__agoraMarker") == "still-here"  # swapped in place, no reload
    assert "via" not in page.locator('#votes-list tr[data-voter="newcomer"]').inner_text()
    assert "proposal.closed" in page.locator("#proposal-ledger").inner_text()
    own = Vote.objects.get(proposal=proposal, voter=newcomer)
    assert own.via is None and own.choice == "yes"
    proposal.refresh_from_db()
    assert proposal.status == "succeeded" and proposal.close_reason == "decided"
    page.reload()
    assert "could no longer change the outcome" in page.locator("#closed-early").inner_text()
    shoot(page, "community-closed-early")

    # Staff approve; the newcomer hears about it (and about the close) in the bell.
    admin_page = log_in(browser, live_server.url, grace.username)
    admin_page.goto(f"/proposals/{proposal.pk}/")
    admin_page.click("#approve-button")
    admin_page.wait_for_load_state()
    assert admin_page.locator("#proposal-status").inner_text() == "Approved"
    shoot(admin_page, "staff-approved")
    assert Proposal.objects.get(pk=proposal.pk).status == "approved"
    page.goto("/notifications/")
    kinds = page.locator("#notification-list li").evaluate_all("items => items.map(i => i.dataset.kind)")
    assert kinds == ["proposal_approved", "proposal_closed", "mention", "proposal_opened"]
    assert bell_count(page) == 3
    shoot(page, "community-notifications-after")

    # Celery turns the approval into a run and a volunteer's agent trains each round (here in-process: the
    # same task JSON, training and upload as the agent's; the volunteer journey runs the real agent).
    run = training.run_start(proposal_id=proposal.pk)
    worker = WorkerFactory(gpus=[], name="attic-cpu")
    for _ in range(run.total_rounds):
        task = training.task_claim(worker=worker)
        body = task_payload(task, request=APIRequestFactory().get("/"), guardrails=[], max_upload_bytes=0)
        data, metrics = train_update(body)
        training.task_submit_result(task_id=task.pk, worker=worker, data=data, metrics=metrics)
        training.round_aggregate(round_id=task.round_id)
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.FINISHED, run.status

    # The newcomer voted for it, so the bell says it finished; the link leads to the run's summary and samples.
    page.goto("/")
    assert bell_count(page) == 4
    page.click("#bell")
    page.wait_for_url("**/notifications/")
    first = page.locator("#notification-list li").first
    assert first.get_attribute("data-kind") == "run_finished"
    first.locator("button").click()
    page.wait_for_url(f"**/runs/{run.pk}/")
    summary = page.locator(".run-summary").inner_text()
    assert "this run finished" in summary, summary
    assert "2 rounds accepted, 0 rejected" in summary and "1 worker contributed" in summary, summary
    assert "try it in the playground" in summary
    for index in (2, 1):  # each sample loads when it scrolls into view
        page.locator(f"#sample-{index}").scroll_into_view_if_needed()
        sample = page.locator(f"#sample-{index} pre.sample")
        sample.wait_for()
        assert len(sample.inner_text()) > len("The "), sample.inner_text()
    shoot(page, "community-run-finished")

    # The phone layout: the navigation folds behind a Menu button.
    phone = log_in(browser, live_server.url, alice.username, width=390)
    assert phone.locator("summary", has_text="alice").count() == 1
    assert not phone.locator("#nav-areas").is_visible()
    phone.click(".nav-toggle")
    assert phone.locator("#nav-areas").is_visible()
    phone.screenshot(path=str(screenshot_dir() / "community-phone-menu-390.png"), full_page=True)
