"""The hash chain: appends link up, tampering with any field of any row is found and named."""

import json
import subprocess
import sys

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from hypothesis import given
from hypothesis import strategies as st

from ledger.chain import GENESIS, PublishedHead, canonical_json, entry_hash, verify
from ledger.models import Entry, Head
from ledger.selectors import iter_chain, ledger_head, ledger_verify
from ledger.services import entry_append


def _append_some(n=5):
    return [
        entry_append(actor="alice", action="test.event", subject=f"thing:{i}", payload={"i": i, "note": "é✓"})
        for i in range(n)
    ]


@pytest.mark.django_db
def test_appends_form_a_linear_chain():
    entries = _append_some(4)
    assert [e.seq for e in entries] == [1, 2, 3, 4]
    assert entries[0].prev_hash == GENESIS
    for prev, cur in zip(entries, entries[1:], strict=False):
        assert cur.prev_hash == prev.hash
    assert ledger_head() == {"seq": 4, "hash": entries[-1].hash}
    verdict = ledger_verify()
    assert verdict.ok and verdict.count == 4


@pytest.mark.django_db
def test_stored_entry_hashes_to_its_hash_after_a_database_round_trip():
    entry_append(actor=None, action="x.y", payload={"f": 0.1, "big": 2**60, "nested": {"b": [1, 2], "a": None}})
    row = Entry.objects.get()
    assert row.actor == "system"
    assert entry_hash(row.as_chain_dict()) == row.hash


@pytest.mark.django_db
@pytest.mark.parametrize(
    "field,value",
    [
        ("payload_json", '{"i":99}'),
        ("payload_json", "not json at all"),
        ("actor", "mallory"),
        ("action", "test.other"),
        ("subject", "thing:x"),
        ("hash", "f" * 64),
        ("prev_hash", "0" * 63 + "1"),
    ],
)
def test_editing_any_field_of_any_row_is_detected_and_named(field, value):
    _append_some(5)
    Entry.objects.filter(seq=3).update(**{field: value})
    verdict = ledger_verify()
    assert not verdict.ok
    assert verdict.broken_seq == 3
    # Only the edited row is named: the next entry's link still matches what was recorded or recomputed.
    assert verdict.broken_seqs == [3], str(verdict)
    with pytest.raises(CommandError, match="seq 3"):
        call_command("verify_ledger")


@pytest.mark.django_db
def test_deleting_the_last_row_is_detected_through_the_head():
    _append_some(3)
    Entry.objects.filter(seq=3).delete()
    verdict = ledger_verify()
    assert not verdict.ok
    assert [(p.seq, p.kind) for p in verdict.problems] == [(3, "truncated")]


@pytest.mark.django_db
def test_rewriting_history_after_a_head_was_published_is_detected():
    _append_some(3)
    published = ledger_head()
    # Someone with database access drops the last entry and the head with it, then appends anew.
    Entry.objects.filter(seq=3).delete()
    Head.objects.filter(id=1).update(seq=2, hash=Entry.objects.get(seq=2).hash)
    entry_append(actor="mallory", action="test.event", subject="thing:2", payload={"i": 2})
    assert ledger_verify().ok  # consistent with itself...
    with pytest.raises(CommandError, match="seq 3: .*published head"):
        call_command("verify_ledger", head=f"{published['seq']}:{published['hash']}")  # ...but not with the head


@pytest.mark.django_db
def test_verify_ledger_refuses_a_malformed_head():
    with pytest.raises(CommandError, match="--head"):
        call_command("verify_ledger", head="3:nothex")


@pytest.mark.django_db
def test_standalone_verifier_over_the_export(tmp_path):
    _append_some(6)
    good = tmp_path / "ledger.json"
    call_command("export_ledger", output=str(good))
    ok = subprocess.run([sys.executable, "-m", "ledger.verify", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "6 entries" in ok.stdout

    data = json.loads(good.read_text())
    data["entries"][4]["payload"]["i"] = 1000
    bad = tmp_path / "tampered.json"
    bad.write_text(json.dumps(data))
    broken = subprocess.run([sys.executable, "-m", "ledger.verify", str(bad)], capture_output=True, text=True)
    assert broken.returncode == 1
    assert "seq 5" in broken.stdout


def test_standalone_verifier_does_not_need_django(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("[]")
    code = "import sys; sys.modules['django'] = None; from ledger.verify import main; sys.exit(main([sys.argv[1]]))"
    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner), max_leaves=20))
def test_canonical_json_is_stable_under_reparsing(value):
    assert canonical_json(json.loads(canonical_json(value))) == canonical_json(value)


def test_verify_reports_a_gap_in_seq():
    chain, prev = [], GENESIS
    for seq in (1, 2, 4):
        body = {"seq": seq, "created_at": "2026-01-01T00:00:00Z", "actor": "a", "action": "b", "subject": "",
                "payload": {}, "prev_hash": prev}
        body["hash"] = entry_hash(body)
        chain.append(body)
        prev = body["hash"]
    verdict = verify(chain)
    assert not verdict.ok and verdict.broken_seq == 4
    assert [p.kind for p in verdict.problems] == ["gap"] and "seq 3 missing" in str(verdict)


@pytest.mark.django_db
def test_ledger_api_pages_and_head(api_client):
    _append_some(7)
    first = api_client.get("/api/v1/ledger/", {"limit": 5}).json()
    assert [e["seq"] for e in first["entries"]] == [1, 2, 3, 4, 5]
    assert first["next_after"] == 5
    rest = api_client.get("/api/v1/ledger/", {"after": first["next_after"], "limit": 5}).json()
    assert [e["seq"] for e in rest["entries"]] == [6, 7] and rest["next_after"] is None
    assert verify(first["entries"] + rest["entries"]).ok
    head = api_client.get("/api/v1/ledger/head").json()
    assert head == {"seq": 7, "hash": Head.objects.get().hash}
    assert first["head"] == head and rest["head"] == head
    assert verify(first["entries"] + rest["entries"], heads=[PublishedHead.from_mapping(head)]).ok
    assert not verify(first["entries"], heads=[PublishedHead.from_mapping(head)]).ok  # a truncated export
    bad = api_client.get("/api/v1/ledger/", {"after": "x"})
    assert bad.status_code == 400 and bad.json()["error"] == "invalid" and "after" in bad.json()["fields"]
    huge = api_client.get("/api/v1/ledger/", {"after": str(2**64)})
    assert huge.status_code == 400 and "after" in huge.json()["fields"]
    nul = api_client.get("/api/v1/ledger/", {"subject": "a\x00b"})
    assert nul.status_code == 400 and "subject" in nul.json()["fields"]


@pytest.mark.django_db
def test_ledger_page_lists_entries(client):
    _append_some(2)
    page = client.get("/ledger/")
    assert page.status_code == 200
    assert b"test.event" in page.content and b"thing:1" in page.content
    assert f"2:{Head.objects.get().hash}".encode() in page.content
    assert list(iter_chain())[0]["seq"] == 1
    assert client.get("/ledger/", {"action": "a\x00"}).status_code == 400
