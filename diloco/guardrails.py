"""Guardrail text filters. Guardrail dicts have the shape of ``governance.selectors.guardrails_active``:
``{"id", "title", "kind", "patterns", "description"}``; patterns are RE2 regular expressions, matched
case-insensitively.

Patterns come from anyone who can write a proposal, so they never run on a backtracking engine: Python's
``re`` needs exponential time for ``(a+)+$`` against ``"a" * 30 + "!"``. RE2 (google-re2) matches in time
linear in the text and refuses what it cannot do that way (backreferences, lookaround); ``max_mem`` bounds
the compiled program. Governance validates proposals with the same rules (``governance.specs``).

A guardrail that RE2 cannot compile (stored before patterns were checked with RE2) is never skipped:
``filter_documents`` and ``check_output`` raise :class:`GuardrailError` naming it, so a task fails with that
reason and the playground withholds its output. Skipping would quietly break a rule the community voted
for; the fix is a proposal that retires the guardrail and adopts an RE2 version of it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import re2

MAX_PATTERNS = 50
MAX_PATTERN_LENGTH = 200
MAX_PROGRAM_BYTES = 8 << 20  # RE2's max_mem for one guardrail's compiled patterns (its default, made explicit)


class GuardrailError(ValueError):
    """A guardrail cannot be enforced: a pattern RE2 cannot compile, or too many or too long patterns."""

    def __init__(self, guardrail: dict, message: str):
        self.guardrail = guardrail
        ident = guardrail.get("id")
        label = f"guardrail #{ident}" if ident is not None else "guardrail"
        if guardrail.get("title"):
            label += f" ({guardrail['title']})"
        super().__init__(f"{label} cannot be enforced: {message}")


def re2_options() -> re2.Options:
    options = re2.Options()
    options.case_sensitive = False
    options.max_mem = MAX_PROGRAM_BYTES
    options.never_capture = True  # only "does it match" is asked; fewer states
    options.log_errors = False
    return options


def _error_text(exc: Exception) -> str:
    message = exc.args[0] if exc.args else exc
    if isinstance(message, bytes):
        message = message.decode("utf-8", errors="replace")
    return str(message)


def pattern_problem(pattern) -> str | None:
    """Why ``pattern`` is refused, in words, or None when RE2 compiles it within the limits."""
    if not isinstance(pattern, str):
        return "A pattern must be a string."
    if not pattern:
        return "Empty pattern (it would match everything)."
    if len(pattern) > MAX_PATTERN_LENGTH:
        return f"At most {MAX_PATTERN_LENGTH} characters; got {len(pattern)}."
    try:
        re2.compile(pattern, re2_options())
    except re2.error as exc:
        return f"Not a valid regular expression for the linear-time RE2 engine: {_error_text(exc)}."
    return None


def _joined(patterns: Iterable[str]) -> str:
    return "|".join(f"(?:{p})" for p in patterns)


@functools.lru_cache(maxsize=256)
def compile_patterns(patterns: tuple[str, ...]):
    """One RE2 program matching any of ``patterns``; ValueError (saying which pattern) if it cannot be built."""
    if not patterns:
        raise ValueError("no patterns")
    if len(patterns) > MAX_PATTERNS:
        raise ValueError(f"at most {MAX_PATTERNS} patterns; got {len(patterns)}")
    for index, pattern in enumerate(patterns):
        problem = pattern_problem(pattern)
        if problem:
            raise ValueError(f"pattern {index + 1} {pattern!r}: {problem}")
    try:
        return re2.compile(_joined(patterns), re2_options())
    except re2.error as exc:
        raise ValueError(f"the patterns together are too large for RE2: {_error_text(exc)}") from None


def _programs(guardrails: list[dict], kind: str):
    for g in guardrails:
        if g.get("kind") != kind or not g.get("active", True) or not g.get("patterns"):
            continue
        patterns = g["patterns"]
        if not isinstance(patterns, list | tuple):
            raise GuardrailError(g, "its patterns are not a list")
        try:
            yield g, compile_patterns(tuple(patterns))
        except (ValueError, TypeError) as exc:
            raise GuardrailError(g, str(exc)) from None


def ensure_enforceable(guardrails: list[dict], kind: str) -> None:
    """Raise :class:`GuardrailError` for the first active guardrail of ``kind`` that cannot be enforced."""
    for _ in _programs(guardrails, kind):
        pass


def filter_documents(docs: list[str], guardrails: list[dict]) -> tuple[list[str], int]:
    """Drop every document matched by a ``data_filter`` guardrail; return (kept, dropped count).

    Raises :class:`GuardrailError` when one of them cannot be enforced (before looking at any document).
    """
    programs = [p for _, p in _programs(guardrails, "data_filter")]
    if not programs:
        return list(docs), 0
    kept = [d for d in docs if not any(p.search(d) for p in programs)]
    return kept, len(docs) - len(kept)


def check_output(text: str, guardrails: list[dict]) -> dict | None:
    """The first ``output_filter`` guardrail whose patterns match ``text``, or None.

    Raises :class:`GuardrailError` when one of them cannot be enforced: the caller withholds the text.
    """
    programs = list(_programs(guardrails, "output_filter"))
    for g, program in programs:
        if program.search(text):
            return g
    return None
