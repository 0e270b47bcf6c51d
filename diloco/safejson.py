"""JSON from strangers: bounded nesting, finite numbers, and strings every database can store.

Python's ``json`` recurses once per level, so a body of ten thousand ``[`` raises ``RecursionError``
(a crash, not a parse error) and a few hundred levels still reach code that recurses again (the ledger's
canonical form, ``jsonb``). ``loads`` refuses, as a ``JsonRefused`` (a ``ValueError``) naming where:

- nesting deeper than ``max_depth`` containers (the server's JSON bodies, the agent's metrics, the
  safetensors header of an update all share this loader);
- ``NaN``, ``Infinity`` and numbers that overflow a double (``1e400`` would become ``inf``);
- NUL characters and lone surrogates in strings or keys (PostgreSQL stores neither).

Pure Python, no Django: the agent and ``diloco`` use it too.
"""

from __future__ import annotations

import json
import math
import re

MAX_DEPTH = 32
_PATH_LEVELS = 4  # a refusal names at most this many levels of the path (``spec.inner.lr``)
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


class JsonRefused(ValueError):
    """The text is JSON that this loader refuses; ``field`` is the dotted path (or ``what``) at fault."""

    def __init__(self, message: str, *, field: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


def _constant(name: str) -> float:
    return float(name)  # NaN, Infinity, -Infinity: refused by ``check``, which knows where they are


def loads(raw: str | bytes | bytearray | memoryview, *, max_depth: int = MAX_DEPTH, what: str = "") -> object:
    """Parse ``raw`` (text, or UTF-8 bytes) under the rules above.

    Raises ``JsonRefused`` for a limit (``field`` names the place), and ``ValueError`` (including
    ``UnicodeDecodeError`` and ``json.JSONDecodeError``) for text that is not JSON at all."""
    if isinstance(raw, bytes | bytearray | memoryview):
        raw = bytes(raw).decode("utf-8")
    try:
        # 1e400 parses as inf and NaN as nan; ``check`` then refuses them by path.
        value = json.loads(raw, parse_constant=_constant)
    except RecursionError:
        raise JsonRefused(f"JSON nested deeper than {max_depth} levels (the limit)", field=_where(what, "")) from None
    check(value, max_depth=max_depth, what=what)
    return value


def _child(path: str, key) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _top(path: str) -> str:
    """The top-level field of a path (``spec`` of ``spec[0][0]``): where a too-deep value is named."""
    return re.split(r"[.\[]", path, maxsplit=1)[0] if path and not path.startswith("[") else ""


def _where(what: str, path: str) -> str:
    if not what:
        return f"body{path}" if not path or path.startswith("[") else path
    if not path:
        return what
    return f"{what}{path}" if path.startswith("[") else f"{what}.{path}"


def check(value: object, *, max_depth: int = MAX_DEPTH, what: str = "") -> None:
    """Apply the depth and string rules to an already parsed value (iteratively: no recursion to exhaust).

    A refusal names the place: ``what`` (the value's own name, e.g. ``metrics``; none for a request body)
    followed by the path inside the value, e.g. ``metrics.loss_end`` or ``spec.inner.lr``."""
    stack: list[tuple[object, int, str]] = [(value, 0, "")]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, dict):
            if depth + 1 > max_depth:
                raise JsonRefused(f"JSON nested deeper than {max_depth} levels (the limit)",
                                  field=_where(what, _top(path)))
            for key, child in item.items():
                if _UNSTORABLE.search(key):
                    raise JsonRefused("keys may not contain NUL characters or lone surrogates", field=_where(what, path))
                stack.append((child, depth + 1, _child(path, key) if depth < _PATH_LEVELS else path))
        elif isinstance(item, list):
            if depth + 1 > max_depth:
                raise JsonRefused(f"JSON nested deeper than {max_depth} levels (the limit)",
                                  field=_where(what, _top(path)))
            if depth < _PATH_LEVELS:
                stack.extend((child, depth + 1, _child(path, i)) for i, child in enumerate(item))
            else:
                stack.extend((child, depth + 1, path) for child in item)
        elif isinstance(item, str):
            if _UNSTORABLE.search(item):
                raise JsonRefused("strings may not contain NUL characters or lone surrogates", field=_where(what, path))
        elif isinstance(item, float) and not math.isfinite(item):
            raise JsonRefused("numbers must be finite (no NaN, Infinity or beyond ±1.8e308)",
                              field=_where(what, path))
