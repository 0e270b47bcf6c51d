"""Rate limits of the worker API. Rates are read at request time from ``REST_FRAMEWORK`` (scopes ``enroll``
and ``heartbeat``), so they follow the settings."""

from __future__ import annotations

from rest_framework.settings import api_settings
from rest_framework.throttling import ScopedRateThrottle

from marketplace.models import Worker


class _LiveRates:
    def get_rate(self):
        return api_settings.DEFAULT_THROTTLE_RATES.get(self.scope)


class EnrollRateThrottle(_LiveRates, ScopedRateThrottle):
    """Enrollment is anonymous: keyed on the client address."""


class WorkerRateThrottle(_LiveRates, ScopedRateThrottle):
    """Keyed on the worker (from its token), not the address: many workers may share one NAT."""

    def get_cache_key(self, request, view):
        if isinstance(request.auth, Worker):
            ident = f"worker-{request.auth.pk}"
        else:
            ident = self.get_ident(request)
        return self.cache_format % {"scope": self.scope, "ident": ident}
