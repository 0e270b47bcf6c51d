"""The hash chain itself: canonical JSON, entry hashes and verification. Pure Python, no Django.

An entry is a dict with ``seq``, ``created_at`` (ISO 8601), ``actor``, ``action``, ``subject``,
``payload`` and ``prev_hash``; its ``hash`` is ``sha256(prev_hash + canonical_json(entry without hash))``.
The first entry's ``prev_hash`` is ``GENESIS``.

A payload is JSON made of objects, arrays, strings, integers, finite floats, booleans and null.
``payload_normalise`` refuses anything else before it is hashed (NaN and infinities have no JSON
spelling, a lone surrogate has no UTF-8 one), and ``stored_json`` is the text a database keeps: the
payload's own canonical JSON in ASCII (``\\u`` escapes), which every text column stores byte for
byte, unlike PostgreSQL's ``jsonb`` that rewrites ``1e16`` as ``10000000000000000`` and ``-0.0`` as
``0.0``. Python's float ``repr`` round-trips every finite double exactly, so parsing the stored text
gives back the very value that was hashed.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

GENESIS = "0" * 64
HASHED_FIELDS = ("seq", "created_at", "actor", "action", "subject", "payload", "prev_hash")
HASH_RE = re.compile(r"^[0-9a-f]{64}$")

# Deeper payloads are refused before they can exhaust the interpreter's recursion limit; ints beyond
# this many bits are refused because other languages' JSON readers cannot hold them exactly anyway.
PAYLOAD_MAX_DEPTH = 64
PAYLOAD_MAX_INT_BITS = 256


class PayloadError(ValueError):
    """A payload value that cannot be hashed and stored exactly; ``path`` names where it is."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path


def canonical_json(value) -> str:
    """Sorted keys, no whitespace, UTF-8 text: the same value always gives the same bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def stored_json(value) -> str:
    """What a database column keeps: the canonical JSON in ASCII, so no text encoding (nor PostgreSQL's
    refusal of NUL characters) can alter it. ``json.loads`` of it equals ``value`` bit for bit."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def entry_hash(entry: Mapping) -> str:
    body = {name: entry[name] for name in HASHED_FIELDS}
    return hashlib.sha256((entry["prev_hash"] + canonical_json(body)).encode("utf-8")).hexdigest()


def _check(value, path: str, depth: int) -> None:
    if depth > PAYLOAD_MAX_DEPTH:
        raise PayloadError(path, f"nested deeper than {PAYLOAD_MAX_DEPTH} levels")
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if value.bit_length() > PAYLOAD_MAX_INT_BITS:
            raise PayloadError(path, f"integer wider than {PAYLOAD_MAX_INT_BITS} bits")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PayloadError(path, f"{value} is not a finite number (JSON has no spelling for it)")
        return
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise PayloadError(path, "text contains a lone surrogate, which is not Unicode text") from None
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str | int):  # JSON writes an int key as its digits
                raise PayloadError(path, f"object key {key!r} is not a string")
            _check(str(key), f"{path}.{key}", depth + 1)
            _check(item, f"{path}.{key}", depth + 1)
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check(item, f"{path}[{index}]", depth + 1)
        return
    raise PayloadError(path, f"{type(value).__name__} is not a JSON value")


def payload_normalise(payload, *, path: str = "payload"):
    """The payload as it will be hashed and read back: checked, with tuples made lists and mappings dicts.

    Raises ``PayloadError`` naming the offending path (``payload.metrics.loss_end``) for a non-finite
    float, a lone surrogate, a non-string key, an unsupported type, excessive depth or a huge integer."""
    _check(payload, path, 0)
    try:
        return json.loads(canonical_json(payload))
    except TypeError as exc:  # e.g. int and str keys mixed in one object cannot be sorted
        raise PayloadError(path, str(exc)) from None


# --- verification ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the chain: ``kind`` is ``hash``, ``link``, ``gap``, ``order``, ``unreadable``,
    ``head`` or ``truncated``; ``seq`` is the entry it concerns."""

    seq: int | None
    kind: str
    detail: str

    def __str__(self) -> str:
        where = f"seq {self.seq}" if self.seq is not None else "entry without a seq"
        return f"{where}: {self.detail}"


@dataclass(frozen=True)
class PublishedHead:
    """A published head: the chain's last seq and that entry's hash, as ``GET /api/v1/ledger/head`` gives."""

    seq: int
    hash: str

    @classmethod
    def parse(cls, text: str) -> PublishedHead:
        """``SEQ:HASH`` (as printed by the verifier and the ledger page)."""
        seq, sep, digest = text.strip().partition(":")
        if not sep or not seq.isdigit() or not HASH_RE.match(digest.lower()):
            raise ValueError(f"a head is SEQ:HASH (a number, a colon and 64 hex digits), not {text!r}")
        return cls(int(seq), digest.lower())

    @classmethod
    def from_mapping(cls, data) -> PublishedHead:
        if not isinstance(data, Mapping):
            raise ValueError("a head is an object with seq and hash")
        seq, digest = data.get("seq"), data.get("hash")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise ValueError("the head's seq is not a non-negative integer")
        if not isinstance(digest, str) or not HASH_RE.match(digest):
            raise ValueError("the head's hash is not 64 lowercase hex digits")
        return cls(seq, digest)

    def __str__(self) -> str:
        return f"{self.seq}:{self.hash}"


@dataclass(frozen=True)
class Verdict:
    count: int
    last_seq: int
    head_hash: str
    problems: tuple[Problem, ...] = ()
    heads_checked: tuple[PublishedHead, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def broken_seq(self) -> int | None:
        """The first broken seq (``None`` when the chain holds)."""
        return self.problems[0].seq if self.problems else None

    @property
    def broken_seqs(self) -> list[int]:
        return sorted({p.seq for p in self.problems if p.seq is not None})

    @property
    def reason(self) -> str:
        return self.problems[0].detail if self.problems else ""

    def __str__(self) -> str:
        if self.ok:
            line = f"ledger OK: {self.count} entries, head {self.last_seq}:{self.head_hash}"
            if not self.heads_checked:
                return line + " (no published head given: entries missing from the end would not show)"
            return line + "; matches the published head " + ", ".join(f"{h.seq}:{h.hash[:12]}…"
                                                                       for h in self.heads_checked)
        lines = [f"ledger BROKEN: {len(self.problems)} problem(s) in {self.count} entries "
                 f"(broken seqs: {', '.join(map(str, self.broken_seqs)) or 'none'})"]
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


def verify(entries: Iterable[Mapping], *, heads: Sequence[PublishedHead] = ()) -> Verdict:
    """Walk the chain in order and report every entry whose seq, link or hash does not hold.

    An edited entry is named once: the next entry's ``prev_hash`` is accepted when it matches either the
    edited entry's recorded hash or its recomputed one, so only the row that changed is reported. Each
    of ``heads`` (published heads) must be reached, and the entry at its seq must carry its hash; this is
    what tells a truncated export from a complete one. Entries after a head are allowed (the chain grew
    since the head was published)."""
    problems: list[Problem] = []
    expected_seq = 1
    prev_recorded = prev_computed = GENESIS
    prev_seq: int | None = None
    last_seq, last_hash, count = 0, GENESIS, 0
    wanted = {head.seq: head for head in heads}
    seen_at: dict[int, object] = {}

    for position, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            problems.append(Problem(None, "unreadable", f"item {position} of the export is not an object"))
            continue
        count += 1
        seq = entry.get("seq")
        if isinstance(seq, bool) or not isinstance(seq, int):
            problems.append(Problem(None, "unreadable", f"item {position} has no integer seq ({seq!r})"))
            continue
        link_checkable = True
        if seq > expected_seq:
            missing = f"seq {expected_seq}" if seq == expected_seq + 1 else f"seqs {expected_seq}–{seq - 1}"
            problems.append(Problem(seq, "gap", f"seq gap: {missing} missing before it"))
            link_checkable = False
        elif seq < expected_seq:
            problems.append(Problem(seq, "order", f"out of order or repeated: comes after seq {expected_seq - 1}"))
            continue
        prev_hash = entry.get("prev_hash")
        if link_checkable and prev_hash not in (prev_recorded, prev_computed):
            previous = "the genesis hash" if prev_seq is None else f"the hash of seq {prev_seq}"
            problems.append(Problem(seq, "link", f"broken link: prev_hash is not {previous}"))
        recorded = entry.get("hash")
        try:
            recomputed = entry_hash(entry)
        except (KeyError, TypeError, ValueError, RecursionError) as exc:
            problems.append(Problem(seq, "unreadable", f"entry cannot be hashed: {type(exc).__name__}: {exc}"))
            recomputed = None
        else:
            if recomputed != recorded:
                problems.append(Problem(seq, "hash", "hash mismatch: the entry's contents do not hash to its "
                                                     "recorded hash (edited after it was written?)"))
        if seq in wanted:
            seen_at[seq] = recorded
        prev_recorded, prev_computed, prev_seq = recorded, recomputed, seq
        expected_seq, last_seq = seq + 1, seq
        last_hash = recorded if isinstance(recorded, str) else ""

    for head in heads:
        if head.seq == 0:
            if head.hash != GENESIS:
                problems.append(Problem(0, "head", "a head at seq 0 must carry the genesis hash"))
        elif last_seq < head.seq:
            problems.append(Problem(head.seq, "truncated",
                                    f"truncated: the entries end at seq {last_seq}, the published head is at "
                                    f"seq {head.seq} ({head.seq - last_seq} entries missing from the end)"))
        elif head.seq not in seen_at:
            problems.append(Problem(head.seq, "head", "the published head's entry is missing"))
        elif seen_at[head.seq] != head.hash:
            problems.append(Problem(head.seq, "head", "this entry's hash differs from the published head's "
                                                      "(history rewritten after the head was published?)"))
    problems.sort(key=lambda p: (p.seq is None, p.seq or 0))
    return Verdict(count, last_seq, last_hash, tuple(problems), tuple(heads))
