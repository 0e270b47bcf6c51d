"""The hash chain itself: canonical JSON, entry hashes and verification. Pure Python, no Django.

An entry is a dict with ``seq``, ``created_at`` (ISO 8601), ``actor``, ``action``, ``subject``,
``payload`` and ``prev_hash``; its ``hash`` is ``sha256(prev_hash + canonical_json(entry without hash))``.
The first entry's ``prev_hash`` is ``GENESIS``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

GENESIS = "0" * 64
HASHED_FIELDS = ("seq", "created_at", "actor", "action", "subject", "payload", "prev_hash")


def canonical_json(value) -> str:
    """Sorted keys, no whitespace, UTF-8 text: the same value always gives the same bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def entry_hash(entry: Mapping) -> str:
    body = {name: entry[name] for name in HASHED_FIELDS}
    return hashlib.sha256((entry["prev_hash"] + canonical_json(body)).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Verdict:
    ok: bool
    count: int
    head_hash: str
    broken_seq: int | None = None
    reason: str = ""

    def __str__(self) -> str:
        if self.ok:
            return f"ledger OK: {self.count} entries, head {self.head_hash}"
        return f"ledger BROKEN at seq {self.broken_seq}: {self.reason}"


def verify(entries: Iterable[Mapping]) -> Verdict:
    """Walk the chain in order and report the first entry whose link or hash does not hold."""
    prev_hash, expected_seq, count = GENESIS, None, 0
    for entry in entries:
        seq = entry.get("seq")
        if expected_seq is not None and seq != expected_seq:
            return Verdict(False, count, prev_hash, seq, f"expected seq {expected_seq}, found {seq}")
        if entry.get("prev_hash") != prev_hash:
            return Verdict(False, count, prev_hash, seq, "prev_hash does not match the previous entry's hash")
        try:
            recomputed = entry_hash(entry)
        except (KeyError, TypeError, ValueError) as exc:
            return Verdict(False, count, prev_hash, seq, f"entry cannot be hashed: {exc}")
        if recomputed != entry.get("hash"):
            return Verdict(False, count, prev_hash, seq, "hash does not match the entry's contents")
        prev_hash, expected_seq, count = entry["hash"], seq + 1, count + 1
    return Verdict(True, count, prev_hash)
