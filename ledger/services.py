from __future__ import annotations

from datetime import UTC

from django.db import transaction
from django.utils import timezone

from ledger.chain import GENESIS, PayloadError, entry_hash, payload_normalise, stored_json
from ledger.errors import LedgerPayloadError
from ledger.models import Entry, Head


def actor_label(actor) -> str:
    """A public name for whoever acted: a user, a worker (anything with ``ledger_label``), or a string."""
    if actor is None:
        return "system"
    if isinstance(actor, str):
        return actor
    label = getattr(actor, "ledger_label", None)
    if label:
        return label
    return getattr(actor, "get_username", lambda: str(actor))()


def _check_label(name: str, value, limit: int) -> None:
    """The text columns must keep exactly what is hashed on every backend: PostgreSQL refuses NUL and
    enforces the length that SQLite would silently exceed."""
    if not isinstance(value, str):
        raise LedgerPayloadError(f"{name}: must be text", path=name)
    if len(value) > limit:
        raise LedgerPayloadError(f"{name}: longer than {limit} characters", path=name)
    if "\x00" in value:
        raise LedgerPayloadError(f"{name}: contains a NUL character", path=name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise LedgerPayloadError(f"{name}: contains a lone surrogate", path=name) from None


@transaction.atomic
def entry_append(*, actor, action: str, subject: str = "", payload: dict | None = None) -> Entry:
    """Append one entry to the chain.

    Runs inside the caller's transaction: the entry exists exactly when the state change it records
    does. The head row is locked (``SELECT … FOR UPDATE`` on PostgreSQL; SQLite's IMMEDIATE
    transactions serialise writers already), so concurrent appends queue up and the chain stays linear.

    The payload must be JSON with finite numbers and Unicode text; anything else raises
    ``LedgerPayloadError`` naming the value before the head is touched. What is stored is the text
    of exactly the value that was hashed, so the entry verifies after any database round trip.
    """
    try:
        payload = payload_normalise(payload if payload is not None else {})
    except PayloadError as exc:
        raise LedgerPayloadError(str(exc), path=exc.path) from None
    actor = actor_label(actor)[:150]
    for name, value, limit in (("actor", actor, 150), ("action", action, 64), ("subject", subject, 64)):
        _check_label(name, value, limit)
    head, _ = Head.objects.select_for_update().get_or_create(id=1, defaults={"seq": 0, "hash": GENESIS})
    now = timezone.now().astimezone(UTC)
    body = {
        "seq": head.seq + 1,
        "created_at": now.isoformat().replace("+00:00", "Z"),
        "actor": actor,
        "action": action,
        "subject": subject,
        "payload": payload,
        "prev_hash": head.hash,
    }
    digest = entry_hash(body)
    entry = Entry.objects.create(
        seq=body["seq"],
        created_at=now,
        actor=body["actor"],
        action=action,
        subject=subject,
        payload_json=stored_json(payload),
        prev_hash=head.hash,
        hash=digest,
    )
    head.seq, head.hash = entry.seq, digest
    head.save(update_fields=["seq", "hash"])
    return entry
