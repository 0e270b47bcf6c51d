"""Rate limits of the worker API. Rates are read at request time from ``REST_FRAMEWORK`` (scopes ``enroll``
and ``heartbeat``), so they follow the settings. They fail open when the cache is down (``fail_open``)."""

from __future__ import annotations

import functools

from django.core.cache import cache as default_cache
from rest_framework.settings import api_settings
from rest_framework.throttling import ScopedRateThrottle

from core.client_ip import client_rate_key
from core.ratelimit import per_account
from core.rates import parse_rate
from marketplace import presence
from marketplace.models import EnrollmentToken, Worker
from marketplace.presence import CACHE_ERRORS, cache_down, fast_redis


def fail_open(throttle_class):
    """Class decorator: a rate limit the cache cannot count is not enforced (a logged warning), so a cache
    outage never turns a worker call into a 500. Wraps the class's own ``allow_request``."""
    inner = throttle_class.allow_request

    @functools.wraps(inner)
    def allow_request(self, request, view):
        try:
            return inner(self, request, view)
        except CACHE_ERRORS as exc:
            cache_down(f"rate limit {getattr(self, 'scope', None) or type(self).__name__} not enforced", exc)
            return True

    throttle_class.allow_request = allow_request
    return throttle_class


class _LiveRates:
    def get_rate(self):
        return api_settings.DEFAULT_THROTTLE_RATES.get(self.scope)

    def parse_rate(self, rate):
        return (None, None) if rate is None else parse_rate(rate)  # also "5/15min"

    def get_ident(self, request):
        # The one client address (core.client_ip): X-Forwarded-For counts only from trusted proxies.
        return client_rate_key(request)


@fail_open
class EnrollRateThrottle(_LiveRates, ScopedRateThrottle):
    """Enrollment is anonymous: keyed on the client address (DRF's sliding window)."""


@fail_open
class WorkerRateThrottle(_LiveRates, ScopedRateThrottle):
    """Keyed on the worker (from its token), not the address: many workers may share one NAT.

    A fixed-window counter instead of DRF's sliding window of timestamps: on Redis it is one pipelined
    ``INCR`` + ``EXPIRE`` (one round trip, no pickled list read and written back) on the heartbeat hot
    path. The price is the usual one of fixed windows: up to twice the rate across a window boundary.
    """

    def get_cache_key(self, request, view):
        if isinstance(request.auth, Worker):
            ident = f"worker-{request.auth.pk}"
        else:
            ident = self.get_ident(request)
        return self.cache_format % {"scope": self.scope, "ident": ident}

    def allow_request(self, request, view):
        self.scope = getattr(view, self.scope_attr, None)
        self.rate = self.get_rate() if self.scope else None
        if self.rate is None:
            return True
        self.num_requests, self.duration = self.parse_rate(self.rate)
        key = self.get_cache_key(request, view)
        self.now = self.timer()
        window = int(self.now // self.duration)
        self.window_ends = (window + 1) * self.duration
        return self._count(f"{key}:{window}") <= self.num_requests

    def wait(self):
        return max(0.0, self.window_ends - self.now)

    def _count(self, key: str) -> int:
        timeout = int(self.duration) + 1
        fast = fast_redis() if self.cache is default_cache else None
        if fast is not None:
            # Django's RedisCache stores integers unpickled, so a raw INCR stays readable by cache.get.
            full_key = fast.key(key)
            pipe = fast.client.pipeline(transaction=False)
            pipe.incr(full_key)
            pipe.expire(full_key, timeout)
            count, _ = pipe.execute()
            return int(count)
        if self.cache.add(key, 1, timeout):
            return 1
        try:
            return self.cache.incr(key)
        except ValueError:  # expired between add and incr
            self.cache.set(key, 1, timeout)
            return 1


def _enrollment_token_owner(request) -> str | None:
    """Enrollment is anonymous, but its token names the member who made it: count per that member."""
    data = request.data
    token = data.get("enrollment_token") if isinstance(data, dict) else None
    if not isinstance(token, str) or not token or len(token) > 200:
        return None
    owner_id = (
        EnrollmentToken.objects.filter(token_hash=presence.token_hash(token)).values_list("owner_id", flat=True).first()
    )
    return None if owner_id is None else f"user:{owner_id}"


EnrollAccountThrottle = per_account("enroll_account", _enrollment_token_owner)
