"""Guardrail text filters. Guardrail dicts have the shape of ``governance.selectors.guardrails_active``:
``{"id", "title", "kind", "patterns", "description"}``; patterns are case-insensitive Python regexes."""

from __future__ import annotations

import functools
import re


@functools.lru_cache(maxsize=256)
def _compile(patterns: tuple[str, ...]) -> re.Pattern:
    try:
        return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"guardrail pattern does not compile: {exc}") from exc


def _matchers(guardrails: list[dict], kind: str):
    for g in guardrails:
        if g.get("kind") != kind or not g.get("active", True) or not g.get("patterns"):
            continue
        yield g, _compile(tuple(g["patterns"]))


def filter_documents(docs: list[str], guardrails: list[dict]) -> tuple[list[str], int]:
    """Drop every document matched by a ``data_filter`` guardrail; return (kept, dropped count)."""
    matchers = [m for _, m in _matchers(guardrails, "data_filter")]
    if not matchers:
        return list(docs), 0
    kept = [d for d in docs if not any(m.search(d) for m in matchers)]
    return kept, len(docs) - len(kept)


def check_output(text: str, guardrails: list[dict]) -> dict | None:
    """The first ``output_filter`` guardrail whose patterns match ``text``, or None."""
    for g, m in _matchers(guardrails, "output_filter"):
        if m.search(text):
            return g
    return None
