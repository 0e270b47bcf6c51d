"""Migration 0002 moves payloads from ``jsonb`` to the hashed text, recovering what jsonb had rewritten."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from hypothesis import given
from hypothesis import strategies as st

from ledger.chain import GENESIS, canonical_json, entry_hash
from ledger.repair import MAX_AMBIGUOUS, restore_payload
from ledger.selectors import ledger_verify


def jsonb_rewrite(value):
    """What PostgreSQL's jsonb made of a payload that Python's json wrote: numbers become ``numeric``,
    so a float spelled with an exponent ≥ 16 reads back as an integer and -0.0 as 0.0."""
    if isinstance(value, float):
        if abs(value) >= 1e16:
            return int(Decimal(repr(value)))
        return 0.0 if value == 0.0 else value
    if isinstance(value, dict):
        return {k: jsonb_rewrite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonb_rewrite(v) for v in value]
    return value


def _entry(payload, seq=1):
    body = {"seq": seq, "created_at": "2026-01-01T00:00:00.123456Z", "actor": "a", "action": "x", "subject": "",
            "payload": payload, "prev_hash": GENESIS}
    body["hash"] = entry_hash(body)
    return body


@given(st.lists(st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from([1.7e308, 1e16, -0.0, 2**70]),
                min_size=1, max_size=6))
def test_restore_payload_recovers_what_jsonb_rewrote(values):
    original = {"v": values, "real_int": 10**20}
    entry = _entry(original)
    damaged = {**entry, "payload": jsonb_rewrite(original)}
    assert canonical_json(restore_payload(damaged)) == canonical_json(original)


def test_restore_payload_leaves_what_it_cannot_explain():
    entry = _entry({"loss": 1.5})
    edited = {**entry, "payload": {"loss": 2.5}}
    assert restore_payload(edited) == {"loss": 2.5}
    many = [1e16 * (i + 1) for i in range(MAX_AMBIGUOUS + 1)]
    too_many = {**_entry({"v": many}), "payload": jsonb_rewrite({"v": many})}
    assert restore_payload(too_many) == jsonb_rewrite({"v": many})


@pytest.mark.django_db(transaction=True)
def test_migration_carries_entries_over_and_they_verify():
    """Entries written the 0001 way (payload in a JSONField: jsonb on PostgreSQL) verify after 0002."""
    executor = MigrationExecutor(connection)
    executor.migrate([("ledger", "0001_initial")])
    try:
        apps = executor.loader.project_state([("ledger", "0001_initial")]).apps
        OldEntry, OldHead = apps.get_model("ledger", "Entry"), apps.get_model("ledger", "Head")
        payloads = [{"loss_end": 1.7e308, "steps": 3}, {"z": -0.0, "big": 1e16, "list": [0.0, 2.5e20, 1e16]},
                    {"plain": 1.0, "text": "é✓😀", "n": 2**70}, {}]
        prev = GENESIS
        for seq, payload in enumerate(payloads, start=1):
            created = datetime(2026, 1, 1, 0, 0, seq, 250000, tzinfo=UTC)
            body = {"seq": seq, "created_at": created.isoformat().replace("+00:00", "Z"), "actor": "alice",
                    "action": "test.old", "subject": f"s:{seq}", "payload": json.loads(canonical_json(payload)),
                    "prev_hash": prev}
            digest = entry_hash(body)
            OldEntry.objects.create(seq=seq, created_at=created, actor="alice", action="test.old",
                                    subject=f"s:{seq}", payload=body["payload"], prev_hash=prev, hash=digest)
            prev = digest
        OldHead.objects.create(id=1, seq=len(payloads), hash=prev)
    finally:
        executor = MigrationExecutor(connection)
        executor.migrate([("ledger", "0002_payload_text")])

    verdict = ledger_verify()
    assert verdict.ok, str(verdict)
    from ledger.models import Entry

    assert canonical_json(Entry.objects.get(seq=2).payload) == canonical_json(payloads[1])
