"""JSON as people can re-hash it: pretty, sorted, never a Python repr, and the few lines that check a hash."""

from __future__ import annotations

import json

from django import template

register = template.Library()

SPEC_SNIPPET = """python3 -c 'import hashlib, json, sys
spec = json.load(sys.stdin)
print(hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest())' < spec.json"""

ENTRY_SNIPPET = """python3 -c 'import hashlib, json, sys
e = json.load(sys.stdin)
body = {k: e[k] for k in ("seq", "created_at", "actor", "action", "subject", "payload", "prev_hash")}
print(hashlib.sha256((e["prev_hash"] + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)).encode()).hexdigest())' < entry.json"""


@register.filter
def pretty_json(value) -> str:
    """Indented JSON with sorted keys: the same value as the canonical JSON that was hashed, easy to read.
    Autoescaped by the template like any other text."""
    return json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False)


@register.filter
def json_value(value) -> str:
    """One spec value as its JSON reads (``true``, ``null``, ``["q_proj", "v_proj"]``), a string as it is."""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


@register.filter
def entry_json(entry) -> str:
    """A ledger entry exactly as it was hashed (``seq`` … ``prev_hash``), plus its ``hash``."""
    return pretty_json(entry.as_chain_dict())


@register.simple_tag
def spec_hash_snippet() -> str:
    return SPEC_SNIPPET


@register.simple_tag
def entry_hash_snippet() -> str:
    return ENTRY_SNIPPET
