"""Payloads survive the real database bit for bit, and hand edits of any rows are each named.

Runs against PostgreSQL when DATABASE_URL is set (CI), where ``jsonb`` used to rewrite 1.7e308 as a
309-digit integer and -0.0 as 0.0, and against SQLite otherwise."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.db.models import F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.chain import PAYLOAD_MAX_INT_BITS, canonical_json
from ledger.errors import LedgerPayloadError
from ledger.models import Entry, Head
from ledger.selectors import ledger_head, ledger_verify
from ledger.services import entry_append

# The values jsonb rewrote, and the edges of a double.
AWKWARD_FLOATS = [1.7e308, 1.7976931348623157e308, -1.7976931348623157e308, 1e16, 1e22, 2.5e20, -0.0, 0.0, 1.0,
                  -1.0, 5e-324, -5e-324, 2.2250738585072014e-308, 2.225073858507201e-308, 1e-07, 0.1, 123456789.125]
AWKWARD_INTS = [0, -1, 2**53 + 1, 2**63, -(2**63) - 1, 10**30, 2**PAYLOAD_MAX_INT_BITS - 1]

floats = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(AWKWARD_FLOATS)
ints = st.integers(min_value=-(2**PAYLOAD_MAX_INT_BITS) + 1, max_value=2**PAYLOAD_MAX_INT_BITS - 1) | st.sampled_from(
    AWKWARD_INTS)
# Any Unicode scalar value: NUL and other controls, astral characters (emoji, U+10FFFF); no lone surrogates.
text = st.text(alphabet=st.characters(codec="utf-8"), max_size=20) | st.sampled_from(
    ["\x00", "a\x00b", "😀", "\U0010ffff", "é✓", "\u2028", "\\u0000", '"'])
leaves = st.none() | st.booleans() | ints | floats | text
payloads = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                        max_leaves=25)

hypothesis_db = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                                HealthCheck.too_slow])


def _exact(value) -> str:
    """Equal strings exactly when the values are bit for bit the same (-0.0 ≠ 0.0, 1.0 ≠ 1): a double's
    repr is unique."""
    return canonical_json(value)


class _Rollback(Exception):
    pass


def _in_rolled_back_transaction(fn):
    """Each hypothesis example starts from an empty ledger: run it in a transaction that is undone."""
    try:
        with transaction.atomic():
            fn()
            raise _Rollback
    except _Rollback:
        pass


@pytest.mark.django_db
@hypothesis_db
@given(st.lists(payloads, min_size=1, max_size=4))
def test_generated_payloads_read_back_bit_for_bit_and_verify(values):
    def example():
        ids = [entry_append(actor="prop", action="test.roundtrip", payload={"v": value}).pk for value in values]
        fresh = {e.pk: e for e in Entry.objects.filter(pk__in=ids)}  # read from the database, not memory
        for pk, value in zip(ids, values, strict=True):
            assert _exact(fresh[pk].payload["v"]) == _exact(value)
        verdict = ledger_verify()
        assert verdict.ok, str(verdict)

    _in_rolled_back_transaction(example)


@pytest.mark.django_db
def test_the_values_jsonb_rewrote_now_verify():
    payload = {"loss_end": 1.7e308, "big": 1e16, "neg_zero": -0.0, "one": 1.0, "int_one": 1, "nul": "a\x00b",
               "astral": "😀", "tiny": 5e-324, "huge_int": 2**200}
    entry_append(actor="worker:1", action="task.completed", payload=payload)
    row = Entry.objects.get()
    assert _exact(row.payload) == _exact(payload)
    assert row.payload_json.isascii()  # what the column holds survives any text encoding
    assert ledger_verify().ok


@pytest.mark.django_db
@pytest.mark.parametrize(("payload", "path"), [
    ({"loss": float("nan")}, "payload.loss"),
    ({"loss": float("inf")}, "payload.loss"),
    ({"deep": {"er": [1, float("-inf")]}}, "payload.deep.er[1]"),
    ({"name": "bad\ud800"}, "payload.name"),
    ({"blob": b"bytes"}, "payload.blob"),
    ({"when": {1, 2}}, "payload.when"),
    ({"big": 2**PAYLOAD_MAX_INT_BITS}, "payload.big"),
    ({"nest": json.loads("[" * 70 + "]" * 70)}, "payload.nest"),
])
def test_a_payload_that_cannot_be_kept_exactly_is_refused_by_path_and_nothing_is_written(payload, path):
    entry_append(actor="a", action="test.before", payload={})
    head_before = ledger_head()
    with pytest.raises(LedgerPayloadError) as caught:
        entry_append(actor="a", action="test.bad", payload=payload)
    assert caught.value.path.startswith(path) and str(caught.value).startswith(path)
    assert caught.value.http_status == 400 and caught.value.code == "invalid_payload"
    assert ledger_head() == head_before and Entry.objects.count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize(("field", "value"), [("subject", "x" * 65), ("action", "a\x00b"), ("actor", "bad\udc00")])
def test_labels_every_database_keeps_exactly(field, value):
    kwargs = {"actor": "a", "action": "test.x", "subject": "", field: value}
    with pytest.raises(LedgerPayloadError, match=f"^{field}"):
        entry_append(**kwargs)
    assert not Entry.objects.exists() and not Head.objects.exists()


# --- tampering ------------------------------------------------------------------------------------

def _sql(statement: str, params) -> None:
    with connection.cursor() as cursor:
        cursor.execute(statement.format(table=Entry._meta.db_table), params)


def _edit_payload(seq):
    row = Entry.objects.get(seq=seq)
    tampered = {**row.payload, "tampered": True}
    _sql("UPDATE {table} SET payload_json = %s WHERE seq = %s", [json.dumps(tampered), seq])


def _edit_payload_number(seq):
    # The same text but one digit different: the kind of edit jsonb made silently.
    row = Entry.objects.get(seq=seq)
    _sql("UPDATE {table} SET payload_json = %s WHERE seq = %s", [row.payload_json.replace("0.5", "0.50000001"), seq])


def _edit_actor(seq):
    _sql("UPDATE {table} SET actor = %s WHERE seq = %s", ["mallory", seq])


def _edit_action(seq):
    _sql("UPDATE {table} SET action = %s WHERE seq = %s", ["vote.cast", seq])


def _edit_created_at(seq):
    Entry.objects.filter(seq=seq).update(created_at=F("created_at") + timedelta(microseconds=1))


def _edit_prev_hash(seq):
    _sql("UPDATE {table} SET prev_hash = %s WHERE seq = %s", ["e" * 64, seq])


def _edit_hash(seq):
    _sql("UPDATE {table} SET hash = %s WHERE seq = %s", ["d" * 63 + str(seq % 10), seq])


EDITS = [_edit_payload, _edit_payload_number, _edit_actor, _edit_action, _edit_created_at, _edit_prev_hash, _edit_hash]
CHAIN_LENGTH = 8


@pytest.mark.django_db
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.integers(min_value=1, max_value=CHAIN_LENGTH), st.sampled_from(EDITS), min_size=1,
                       max_size=4))
def test_editing_any_rows_in_the_database_names_each_of_them(edits):
    def example():
        for i in range(CHAIN_LENGTH):
            entry_append(actor="alice", action="test.event", subject=f"thing:{i}",
                         payload={"i": i, "score": 0.5, "big": 1.7e308, "z": -0.0, "s": "a\x00😀"})
        assert ledger_verify().ok
        for seq, edit in edits.items():
            edit(seq)
        verdict = ledger_verify()
        assert verdict.broken_seqs == sorted(edits), str(verdict)
        for seq in edits:
            assert f"seq {seq}:" in str(verdict)

    _in_rolled_back_transaction(example)


@pytest.mark.django_db
def test_verify_ledger_names_every_broken_entry():
    from django.core.management import call_command
    from django.core.management.base import CommandError

    for i in range(6):
        entry_append(actor="alice", action="test.event", payload={"i": i})
    _edit_payload(2)
    _edit_actor(5)
    with pytest.raises(CommandError) as caught:
        call_command("verify_ledger")
    message = str(caught.value)
    assert "seq 2: hash mismatch" in message and "seq 5: hash mismatch" in message
    assert "seq 3" not in message and "seq 6" not in message


@pytest.mark.django_db
def test_an_export_through_the_public_api_verifies_against_its_head(api_client):
    """What anyone outside can do: page through the API, parse it as JSON, verify against the head."""
    from ledger.chain import PublishedHead, verify

    for value in AWKWARD_FLOATS + AWKWARD_INTS + ["a\x00b", "😀\U0010ffff"]:
        entry_append(actor="alice", action="test.export", payload={"v": value, "nested": [{"v": value}]})
    entries, after = [], 0
    while after is not None:
        page = json.loads(api_client.get("/api/v1/ledger/", {"after": after, "limit": 7}).content)
        entries += page["entries"]
        after = page["next_after"]
    head = PublishedHead.from_mapping(json.loads(api_client.get("/api/v1/ledger/head").content))
    verdict = verify(entries, heads=[head])
    assert verdict.ok and verdict.count == len(AWKWARD_FLOATS) + len(AWKWARD_INTS) + 2, str(verdict)
    assert not verify(entries[:-1], heads=[head]).ok
