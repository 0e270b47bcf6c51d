"""Recover payloads that PostgreSQL's ``jsonb`` rewrote before the ledger stored text. Pure Python.

Up to migration 0001 the payload lived in a ``jsonb`` column, which keeps numbers as ``numeric``:
a float written as ``1e+16`` or ``1.7e+308`` came back as a long integer and ``-0.0`` as ``0.0``, so
the entry no longer hashed to its recorded hash although nobody had touched it. The recorded hash
tells which reading is the original: this module tries the few readings ``jsonb`` can have produced
and keeps the one that hashes to the recorded hash. An entry that matches none of them is left as
read, and the verifier reports it.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

from ledger.chain import entry_hash

# A float whose repr uses an exponent of 16 or more comes back from jsonb as an integer at least this big.
_FLOAT_AS_INT_MIN = 10**16
# Each ambiguous number doubles the readings to try; beyond this many an entry is left for the verifier.
MAX_AMBIGUOUS = 12


def _ambiguous_paths(value, path=()):
    if isinstance(value, bool):
        return
    if isinstance(value, int) and abs(value) >= _FLOAT_AS_INT_MIN:
        yield path
    elif isinstance(value, float) and value == 0.0:
        yield path
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _ambiguous_paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _ambiguous_paths(item, (*path, index))


def _alternative(value):
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            return value
    return -value if str(value) == "0.0" else 0.0  # 0.0 <-> -0.0


def _replaced(value, path, new):
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replaced(value[head], rest, new)}
    out = list(value)
    out[head] = _replaced(value[head], rest, new)
    return out


def restore_payload(entry: Mapping):
    """The payload of ``entry`` (a chain dict with ``hash``) that hashes to its recorded hash, trying the
    readings jsonb may have rewritten; the payload as given when none matches."""
    if entry_hash(entry) == entry["hash"]:
        return entry["payload"]
    paths = list(_ambiguous_paths(entry["payload"]))
    if not paths or len(paths) > MAX_AMBIGUOUS:
        return entry["payload"]
    # Most likely first: every ambiguous number was a float (or negative zero), then fewer of them.
    for size in range(len(paths), 0, -1):
        for chosen in itertools.combinations(paths, size):
            payload = entry["payload"]
            for path in chosen:
                payload = _replaced(payload, path, _alternative(_get(payload, path)))
            if entry_hash({**entry, "payload": payload}) == entry["hash"]:
                return payload
    return entry["payload"]


def _get(value, path):
    for part in path:
        value = value[part]
    return value
