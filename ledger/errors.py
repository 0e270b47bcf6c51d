"""Domain errors of the ledger. The project's API exception handler renders any exception with ``code``
and ``http_status`` as ``{"error": code, "detail": message}``."""

from __future__ import annotations


class LedgerError(Exception):
    code = "ledger_error"
    http_status = 400


class LedgerPayloadError(LedgerError, ValueError):
    """A payload the chain cannot record exactly (a non-finite number, a lone surrogate, a huge integer,
    excessive nesting). ``path`` names the value, e.g. ``payload.metrics.loss_end``. Raised before
    anything is written; the caller's transaction rolls back with it."""

    code = "invalid_payload"

    def __init__(self, message: str, *, path: str = "payload"):
        super().__init__(message)
        self.path = path
