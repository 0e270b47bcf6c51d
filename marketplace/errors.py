"""Domain errors of the worker registry. The project's API exception handler renders any exception with
``code`` and ``http_status`` as ``{"error": code, "detail": message}``."""

from __future__ import annotations


class MarketplaceError(Exception):
    code = "marketplace_error"
    http_status = 400

    def __init__(self, message: str = "", *, code: str | None = None, http_status: int | None = None):
        super().__init__(message or self.__class__.__doc__ or self.code)
        if code:
            self.code = code
        if http_status:
            self.http_status = http_status


class EnrollmentTokenInvalid(MarketplaceError):
    """This enrollment token is unknown. Create a new one on "Add a worker"."""

    code = "invalid_enrollment_token"
    http_status = 401


class EnrollmentTokenExpired(MarketplaceError):
    """This enrollment token has expired. Create a new one on "Add a worker"."""

    code = "enrollment_token_expired"
    http_status = 403


class EnrollmentTokenUsed(MarketplaceError):
    """This enrollment token was already used to enroll a worker; each token works once."""

    code = "enrollment_token_used"
    http_status = 403


class WorkerTokenInvalid(MarketplaceError):
    """The worker token is unknown or was revoked. Enroll the worker again."""

    code = "invalid_token"
    http_status = 401


class WorkerSuspended(MarketplaceError):
    """This worker is suspended by the administrators."""

    code = "worker_suspended"
    http_status = 403


class WorkerStateError(MarketplaceError):
    """The worker is not in a state that allows this."""

    code = "invalid_state"
    http_status = 409


class WorkerPermissionDenied(MarketplaceError):
    """You may not do this to this worker."""

    code = "permission_denied"
    http_status = 403
