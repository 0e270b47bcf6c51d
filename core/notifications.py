"""How any app asks for a member to be notified without importing the app that stores notifications.

``marketplace`` and ``training`` call ``notify_users``; ``governance`` (which owns the notification model,
the bell and the preferences) connects the receiver when it starts. Imports nothing of ours.
"""

from __future__ import annotations

from django.dispatch import Signal

# Sent with ``user_ids`` (iterable of ints), ``kind`` (a ``governance.models.Notification.Kind`` value),
# ``text`` and ``url``.
notification_requested = Signal()


def notify_users(*, user_ids, kind: str, text: str, url: str = "") -> None:
    """Notify these members (in the app and, if they chose it, by e-mail). Call inside the writer's
    transaction: the rows commit with it and the e-mails go only once it has committed."""
    ids = sorted({int(pk) for pk in user_ids if pk is not None})
    if ids:
        notification_requested.send(sender=None, user_ids=ids, kind=kind, text=text, url=url)
