"""The verifier (pure Python and ``python -m ledger.verify``): every broken entry is named with what is
wrong, and a published head tells a truncated export from a complete one."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from ledger.chain import GENESIS, PublishedHead, entry_hash, verify


def _chain(n: int) -> list[dict]:
    chain, prev = [], GENESIS
    for seq in range(1, n + 1):
        body = {"seq": seq, "created_at": f"2026-01-01T00:00:{seq:02d}Z", "actor": "a", "action": "test.event",
                "subject": "", "payload": {"i": seq, "f": 1.7e308, "z": -0.0}, "prev_hash": prev}
        body["hash"] = entry_hash(body)
        chain.append(body)
        prev = body["hash"]
    return chain


def _head(chain) -> PublishedHead:
    return PublishedHead(chain[-1]["seq"], chain[-1]["hash"])


def test_a_sound_chain_verifies_and_matches_its_head():
    chain = _chain(5)
    verdict = verify(chain, heads=[_head(chain)])
    assert verdict.ok and verdict.count == 5 and verdict.last_seq == 5 and "matches the published head" in str(verdict)
    assert "no published head" in str(verify(chain))


def test_every_edited_entry_is_named_and_only_those():
    chain = _chain(10)
    chain[2]["payload"]["i"] = 999           # seq 3: contents
    chain[6]["actor"] = "mallory"            # seq 7: contents
    chain[8]["hash"] = "f" * 64              # seq 9: recorded hash
    verdict = verify(chain, heads=[PublishedHead(10, chain[9]["hash"])])
    assert verdict.broken_seqs == [3, 7, 9], str(verdict)
    assert all(p.kind == "hash" for p in verdict.problems)
    assert verdict.broken_seq == 3


def test_a_broken_link_is_named():
    chain = _chain(5)
    chain[3]["prev_hash"] = "e" * 64
    chain[3]["hash"] = entry_hash(chain[3])  # re-hashed, so its contents hash right but it links nowhere...
    verdict = verify(chain)
    # ...and the next entry points at a hash seq 4 no longer has.
    assert [(p.seq, p.kind) for p in verdict.problems] == [(4, "link"), (5, "link")]
    assert "seq 4: broken link: prev_hash is not the hash of seq 3" in str(verdict)


def test_missing_entries_in_the_middle_are_a_gap_and_a_repeated_entry_is_named():
    chain = _chain(8)
    gapped = chain[:3] + chain[5:]
    verdict = verify(gapped)
    assert [(p.seq, p.kind) for p in verdict.problems] == [(6, "gap")]
    assert "seqs 4–5 missing" in str(verdict)
    repeated = chain[:4] + [copy.deepcopy(chain[2])] + chain[4:]
    verdict = verify(repeated)
    assert [(p.seq, p.kind) for p in verdict.problems] == [(3, "order")]


def test_a_truncated_export_is_told_from_a_complete_one_by_the_head():
    chain = _chain(6)
    head = _head(chain)
    assert verify(chain[:4]).ok  # without a head, a prefix looks complete
    verdict = verify(chain[:4], heads=[head])
    assert [(p.seq, p.kind) for p in verdict.problems] == [(6, "truncated")]
    assert "2 entries missing from the end" in str(verdict)
    # Entries appended after the head was published are fine.
    assert verify(chain, heads=[PublishedHead(4, chain[3]["hash"])]).ok
    # A history rewritten after the head was published is not.
    rewritten = _chain(6)
    rewritten[5]["created_at"] = "2027-01-01T00:00:00Z"
    rewritten[5]["hash"] = entry_hash(rewritten[5])
    verdict = verify(rewritten, heads=[head])
    assert [(p.seq, p.kind) for p in verdict.problems] == [(6, "head")]


def test_unreadable_items_are_reported_not_raised():
    chain = _chain(3)
    chain[1]["payload"] = {"x": float("nan")}
    del chain[2]["actor"]
    verdict = verify([*chain, "junk", {"seq": "x"}])
    kinds = [(p.seq, p.kind) for p in verdict.problems]
    assert (2, "unreadable") in kinds and (3, "unreadable") in kinds
    assert sum(1 for p in verdict.problems if p.seq is None) == 2


@pytest.mark.parametrize("text", ["5", "5:abc", "x:" + "a" * 64, "-1:" + "a" * 64, "5:" + "g" * 64])
def test_a_malformed_head_is_refused(text):
    with pytest.raises(ValueError):
        PublishedHead.parse(text)


def _cli(*args, stdin: str | None = None):
    return subprocess.run([sys.executable, "-m", "ledger.verify", *args], capture_output=True, text=True, input=stdin)


def test_cli_names_every_broken_entry_and_uses_the_head_of_the_export(tmp_path):
    chain = _chain(8)
    export = {"head": {"seq": 8, "hash": chain[-1]["hash"]}, "entries": chain}
    good = tmp_path / "good.json"
    good.write_text(json.dumps(export))
    ok = _cli(str(good))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "8 entries" in ok.stdout and "head recorded in the export" in ok.stdout

    tampered = copy.deepcopy(export)
    tampered["entries"][1]["payload"]["i"] = 0
    tampered["entries"][5]["subject"] = "proposal:1"
    path = tmp_path / "tampered.json"
    path.write_text(json.dumps(tampered))
    broken = _cli(str(path))
    assert broken.returncode == 1
    assert "seq 2: hash mismatch" in broken.stdout and "seq 6: hash mismatch" in broken.stdout

    truncated = {"head": export["head"], "entries": chain[:5]}
    path = tmp_path / "truncated.json"
    path.write_text(json.dumps(truncated))
    cut = _cli(str(path))
    assert cut.returncode == 1 and "truncated" in cut.stdout and "seq 8" in cut.stdout


def test_cli_head_argument_overrides_the_export(tmp_path):
    chain = _chain(6)
    # An export whose own head was trimmed along with its entries: only an independent head shows it.
    export = {"head": {"seq": 4, "hash": chain[3]["hash"]}, "entries": chain[:4]}
    path = tmp_path / "export.json"
    path.write_text(json.dumps(export))
    assert _cli(str(path)).returncode == 0
    cut = _cli(str(path), "--head", f"6:{chain[5]['hash']}")
    assert cut.returncode == 1 and "truncated" in cut.stdout
    assert _cli("-", "--head", f"6:{chain[5]['hash']}", stdin=json.dumps(chain)).returncode == 0


@pytest.mark.parametrize("content", ["{not json", '{"entries": 5}', "[" * 100000, '{"entries": [], "head": {"seq": -1}}'])
def test_cli_unreadable_file_is_exit_status_2(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    run = _cli(str(path))
    assert run.returncode == 2 and "cannot read" in run.stderr and "Traceback" not in run.stderr


def test_cli_refuses_a_malformed_head_argument(tmp_path):
    path = tmp_path / "e.json"
    path.write_text("[]")
    run = _cli(str(path), "--head", "nope")
    assert run.returncode == 2 and "SEQ:HASH" in run.stderr
