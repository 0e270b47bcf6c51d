"""Notifications of members: rows for the bell and, where the member chose it, an e-mail.

Other apps send through ``core.notifications.notify_users`` (connected to ``notify`` in ``GovernanceConfig``),
so marketplace and training never import governance for this.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.mail import send_mass_mail
from django.db import transaction
from django.utils import timezone

from governance.models import Notification, NotificationPreference

logger = logging.getLogger(__name__)
Kind = Notification.Kind

# Without a preference row: every kind shows in the app; e-mail for what concerns the member directly.
EMAIL_BY_DEFAULT = frozenset(
    {Kind.PROPOSAL_CLOSED, Kind.PROPOSAL_APPROVED, Kind.MENTION, Kind.DELEGATION, Kind.RUN_FINISHED,
     Kind.WORKER_OFFLINE, Kind.WORKER_SUSPENDED}
)


def preferences_for(*, user) -> dict[str, dict[str, bool]]:
    """``{kind: {"in_app": bool, "email": bool}}`` for every kind, defaults filled in."""
    prefs = {kind: {"in_app": True, "email": kind in EMAIL_BY_DEFAULT} for kind in Kind.values}
    for row in NotificationPreference.objects.filter(user=user):
        prefs[row.kind] = {"in_app": row.in_app, "email": row.email}
    return prefs


@transaction.atomic
def preferences_set(*, user, choices: dict[str, dict[str, bool]]) -> None:
    """Store the member's choice for each kind named in ``choices``; unknown kinds are refused."""
    unknown = set(choices) - set(Kind.values)
    if unknown:
        from rest_framework import serializers

        raise serializers.ValidationError({"kind": [f"Unknown notification kind: {', '.join(sorted(unknown))}."]})
    for kind, choice in choices.items():
        NotificationPreference.objects.update_or_create(
            user=user, kind=kind, defaults={"in_app": bool(choice.get("in_app")), "email": bool(choice.get("email"))}
        )


def notify(*, user_ids, kind: str, text: str, url: str = "", **_) -> int:
    """Create the in-app rows and queue the e-mails for these members per their preferences.

    Returns how many members were told in the app. E-mails leave after the transaction commits; a failing
    mail server is logged and never undoes the change that caused the notification."""
    if kind not in Kind.values:
        raise ValueError(f"unknown notification kind {kind!r}")
    ids = sorted({int(pk) for pk in user_ids})
    if not ids:
        return 0
    rows = {row.user_id: row for row in NotificationPreference.objects.filter(user_id__in=ids, kind=kind)}
    in_app = [pk for pk in ids if (rows[pk].in_app if pk in rows else True)]
    by_mail = [pk for pk in ids if (rows[pk].email if pk in rows else kind in EMAIL_BY_DEFAULT)]
    now = timezone.now()
    Notification.objects.bulk_create(
        [Notification(user_id=pk, kind=kind, text=text[:300], url=url[:300], created_at=now) for pk in in_app]
    )
    if by_mail:
        addresses = list(
            get_user_model().objects.filter(pk__in=by_mail, is_active=True).exclude(email="").values_list("email", flat=True)
        )
        if addresses:
            link = f"{settings.AGORA_PUBLIC_URL.rstrip('/')}{url}" if url.startswith("/") else url
            body = f"{text}\n\n{link}\n\nChoose what Agora tells you: {settings.AGORA_PUBLIC_URL.rstrip('/')}/notifications/settings/\n"
            subject = f"{settings.ACCOUNT_EMAIL_SUBJECT_PREFIX}{text}"[:150]
            messages = [(subject, body, settings.DEFAULT_FROM_EMAIL, [address]) for address in addresses]
            transaction.on_commit(lambda: _send(messages))
    return len(in_app)


def _send(messages) -> None:
    try:
        send_mass_mail(messages, fail_silently=False)
    except Exception:  # the mail server being down must not turn a vote or a round into an error
        logger.exception("sending %d notification e-mails failed", len(messages))


def notifications_mark_read(*, user, ids: list[int] | None = None) -> int:
    """Mark these (or all) of the member's unread notifications read; returns how many changed."""
    qs = Notification.objects.filter(user=user, read_at__isnull=True)
    if ids is not None:
        qs = qs.filter(pk__in=ids)
    return qs.update(read_at=timezone.now())


def unread_count(*, user) -> int:
    if not user.is_authenticated:
        return 0
    return Notification.objects.filter(user=user, read_at__isnull=True).count()
