from __future__ import annotations

import json
from datetime import UTC

from django.db import transaction
from django.utils import timezone

from ledger.chain import GENESIS, canonical_json, entry_hash
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


@transaction.atomic
def entry_append(*, actor, action: str, subject: str = "", payload: dict | None = None) -> Entry:
    """Append one entry to the chain.

    Runs inside the caller's transaction: the entry exists exactly when the state change it records
    does. The head row is locked (``SELECT … FOR UPDATE`` on PostgreSQL; SQLite's IMMEDIATE
    transactions serialise writers already), so concurrent appends queue up and the chain stays linear.
    """
    # Round-trip through canonical JSON so what is stored is exactly what was hashed.
    payload = json.loads(canonical_json(payload or {}))
    head, _ = Head.objects.select_for_update().get_or_create(id=1, defaults={"seq": 0, "hash": GENESIS})
    now = timezone.now().astimezone(UTC)
    body = {
        "seq": head.seq + 1,
        "created_at": now.isoformat().replace("+00:00", "Z"),
        "actor": actor_label(actor)[:150],
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
        payload=payload,
        prev_hash=head.hash,
        hash=digest,
    )
    head.seq, head.hash = entry.seq, digest
    head.save(update_fields=["seq", "hash"])
    return entry
