"""Notifications: in the app (bell, list, mark read) and by e-mail, per the member's choices, for proposals
opening and closing, approvals, mentions, delegations, runs finishing and workers going offline or suspended."""

from __future__ import annotations

import pytest
from django.core import mail
from django.test import override_settings

from core.notifications import notify_users
from governance import services
from governance.models import Notification
from governance.notifications import preferences_set
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def kinds_of(user) -> list[str]:
    return list(Notification.objects.filter(user=user).values_list("kind", flat=True))


def test_opening_tells_the_members_who_may_vote_in_the_app_but_not_by_mail(member, other_member,
                                                                           django_capture_on_commit_callbacks):
    unverified = UserFactory(verified=False)
    with django_capture_on_commit_callbacks(execute=True):
        proposal = services.proposal_submit(author=member, kind="training", title="Open up", spec={}, open_now=True)
    assert kinds_of(other_member) == ["proposal_opened"]
    assert kinds_of(member) == [] and kinds_of(unverified) == []
    assert Notification.objects.get(user=other_member).url == proposal.get_absolute_url()
    assert mail.outbox == []


@override_settings(AGORA_EARLY_CLOSE=False)
def test_closing_and_approval_tell_author_and_voters_by_mail_too(member, other_member, staff,
                                                                  django_capture_on_commit_callbacks, settings):
    settings.AGORA_QUORUM_MIN = 1
    proposal = services.proposal_submit(author=member, kind="training", title="Train it", spec={}, open_now=True)
    services.vote_cast(proposal=proposal, voter=other_member, choice="yes")
    with django_capture_on_commit_callbacks(execute=True):
        services.proposal_close_early(proposal=proposal, by=staff, reason="Enough votes")
    assert "proposal_closed" in kinds_of(member) and "proposal_closed" in kinds_of(other_member)
    assert sorted(m.to[0] for m in mail.outbox) == sorted([member.email, other_member.email])
    assert "closed early: succeeded" in mail.outbox[0].subject
    assert proposal.get_absolute_url() in mail.outbox[0].body
    mail.outbox.clear()
    with django_capture_on_commit_callbacks(execute=True):
        services.proposal_approve(proposal=proposal, by=staff)
    assert kinds_of(other_member).count("proposal_approved") == 1
    assert len(mail.outbox) == 2


def test_each_member_chooses_in_app_and_mail_per_kind(member, other_member, django_capture_on_commit_callbacks):
    preferences_set(user=other_member, choices={"mention": {"in_app": False, "email": False}})
    preferences_set(user=member, choices={"proposal_opened": {"in_app": True, "email": True}})
    with django_capture_on_commit_callbacks(execute=True):
        notify_users(user_ids=[member.pk, other_member.pk], kind="mention", text="hello", url="/")
        services.proposal_submit(author=UserFactory(), kind="training", title="Mail me", spec={}, open_now=True)
    assert kinds_of(other_member) == ["proposal_opened"]
    assert sorted(kinds_of(member)) == ["mention", "proposal_opened"]
    assert [m.to[0] for m in mail.outbox if "Mail me" in m.subject] == [member.email]


def test_an_unknown_kind_in_the_preferences_is_refused(member):
    from rest_framework import serializers

    with pytest.raises(serializers.ValidationError):
        preferences_set(user=member, choices={"spam": {"in_app": True}})


def test_mentions_notify_the_named_members_once_and_not_the_author(member, django_capture_on_commit_callbacks):
    ada = UserFactory(username="ada")
    bob = UserFactory(username="bob.b")
    proposal = services.proposal_submit(author=member, kind="training", title="Talk", spec={})
    with django_capture_on_commit_callbacks(execute=True):
        comment = services.comment_post(
            proposal=proposal, author=ada,
            body=f"@bob.b and @nobody and @bob.b, see mail@example.org; I am @ada. @{member.username}",
        )
    assert kinds_of(bob) == ["mention"] and kinds_of(ada) == []
    assert Notification.objects.get(user=bob).url.endswith(f"#comment-{comment.pk}")
    assert kinds_of(member) == ["mention"]
    from ledger.models import Entry

    assert Entry.objects.get(action="comment.posted").payload["mentions"] == sorted([bob.pk, member.pk])


def test_the_bell_the_list_and_marking_read(client, member, other_member):
    notify_users(user_ids=[member.pk], kind="mention", text="First", url="/proposals/")
    notify_users(user_ids=[member.pk], kind="mention", text="Second", url="//evil.example/")
    notify_users(user_ids=[other_member.pk], kind="mention", text="Not yours", url="/")
    client.force_login(member)
    html = client.get("/").content.decode()
    assert 'id="bell-count">2<' in html
    html = client.get("/notifications/").content.decode()
    assert "First" in html and "Second" in html and "Not yours" not in html
    first = Notification.objects.get(text="First")
    assert client.post(f"/notifications/{first.pk}/open")["Location"] == "/proposals/"
    second = Notification.objects.get(text="Second")
    assert client.post(f"/notifications/{second.pk}/open")["Location"] == "/"  # never off-site
    assert 'id="bell-count"' not in client.get("/").content.decode()
    theirs = Notification.objects.get(text="Not yours")
    assert client.post(f"/notifications/{theirs.pk}/open").status_code == 404
    assert Notification.objects.get(pk=theirs.pk).read_at is None
    notify_users(user_ids=[member.pk], kind="mention", text="Third")
    client.post("/notifications/")
    assert not Notification.objects.filter(user=member, read_at__isnull=True).exists()


def test_the_settings_page_saves_the_choices(client, member):
    client.force_login(member)
    assert client.get("/notifications/settings/").status_code == 200
    client.post("/notifications/settings/", {"mention:email": "on", "run_finished:in_app": "on"})
    from governance.notifications import preferences_for

    prefs = preferences_for(user=member)
    assert prefs["mention"] == {"in_app": False, "email": True}
    assert prefs["run_finished"] == {"in_app": True, "email": False}


def test_a_suspended_worker_tells_its_owner(member, staff, django_capture_on_commit_callbacks):
    from marketplace.models import Worker
    from marketplace.services import worker_suspend

    worker = Worker.objects.create(owner=member, name="gpu-box", token_hash="x" * 64)
    with django_capture_on_commit_callbacks(execute=True):
        worker_suspend(worker=worker, by=staff, reason="sent NaNs")
    note = Notification.objects.get(user=member)
    assert note.kind == "worker_suspended" and "gpu-box" in note.text and "sent NaNs" in note.text
    assert [m.to[0] for m in mail.outbox] == [member.email]


def test_a_worker_going_offline_tells_its_owner(member, settings):
    from marketplace import presence
    from marketplace.models import Worker
    from marketplace.services import worker_sweep_offline

    worker = Worker.objects.create(owner=member, name="laptop", token_hash="y" * 64)
    presence.presence_record(worker.pk, state="idle", task_id=None, progress=None)
    assert worker_sweep_offline()["came_online"] == [worker.pk]
    presence.presence_forget(worker.pk)
    assert worker_sweep_offline()["went_offline"] == [worker.pk]
    note = Notification.objects.get(user=member)
    assert note.kind == "worker_offline" and "laptop" in note.text


def test_notifications_api_lists_mine_and_marks_them_read(member, other_member, member_client, api_client):
    notify_users(user_ids=[member.pk], kind="mention", text="One", url="/")
    notify_users(user_ids=[member.pk], kind="delegation", text="Two", url="/delegations/")
    notify_users(user_ids=[other_member.pk], kind="mention", text="Theirs")
    assert api_client.get("/api/v1/notifications/").status_code in (401, 403)
    body = member_client.get("/api/v1/notifications/").json()
    assert [n["text"] for n in body["results"]] == ["Two", "One"]
    one = Notification.objects.get(text="One")
    theirs = Notification.objects.get(text="Theirs")
    response = member_client.post("/api/v1/notifications/read", {"ids": [one.pk, theirs.pk]}, format="json")
    assert response.json() == {"marked_read": 1}
    assert [n["text"] for n in member_client.get("/api/v1/notifications/?unread=1").json()["results"]] == ["Two"]
    assert Notification.objects.get(pk=theirs.pk).read_at is None
    response = member_client.post("/api/v1/notifications/read", {"ids": ["x"]}, format="json")
    assert response.status_code == 400 and "ids" in response.json()["detail"]
    assert member_client.post("/api/v1/notifications/read", {}, format="json").json() == {"marked_read": 1}
