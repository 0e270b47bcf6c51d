"""Rate limits per client address and per account, for DRF views and plain Django views alike.

Rates are named scopes in ``REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]`` (set from ``AGORA_RATE_*``), read
at request time so settings overrides apply. A rate is ``N/period`` where period is ``s``, ``min``,
``hour`` or ``day``, optionally with a multiplier (``5/15min``); an empty rate means no limit.

Counting is a fixed window per scope and key: one ``add`` + ``incr`` in the cache (atomic on Redis). The
price of fixed windows is the usual one: up to twice the rate across a window boundary. When the cache is
down the limit fails open with a logged warning (login lockout lives in the database, so it still holds).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from functools import wraps

from django.core.cache import cache
from django.shortcuts import render
from rest_framework.settings import api_settings
from rest_framework.throttling import BaseThrottle

from core.client_ip import client_rate_key
from core.rates import parse_rate

logger = logging.getLogger(__name__)


def rate_for(scope: str) -> str | None:
    return api_settings.DEFAULT_THROTTLE_RATES.get(scope) or None


def _digest(ident: str) -> str:
    # Keys are arbitrary user input (usernames): hash them into something every cache backend accepts.
    return hashlib.sha256(ident.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _count(key: str, timeout: int) -> int:
    if cache.add(key, 1, timeout):
        return 1
    try:
        return cache.incr(key)
    except ValueError:  # expired between add and incr
        cache.set(key, 1, timeout)
        return 1


def consume(scope: str, ident: str) -> int | None:
    """Count one request of ``ident`` against ``scope``; the seconds to wait if it is over the limit."""
    rate = rate_for(scope)
    if not rate:
        return None
    limit, duration = parse_rate(rate)
    now = time.time()
    window = int(now // duration)
    key = f"rl:{scope}:{_digest(ident)}:{window}"
    try:
        count = _count(key, duration + 1)
    except Exception:  # the cache is down: fail open, loudly
        logger.warning("rate limit %s not enforced: the cache is unavailable", scope, exc_info=True)
        return None
    if count <= limit:
        return None
    return max(1, math.ceil((window + 1) * duration - now))


def _submitted(request, name: str) -> str | None:
    data = getattr(request, "data", None)
    if data is None:
        data = request.POST
    try:
        value = data.get(name)
    except AttributeError:  # a JSON body that is a list or a string
        return None
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip().casefold()


def submitted_username(request) -> str | None:
    """The account a log-in attempt is for, as typed (``login`` on the form, ``username`` in the API)."""
    return _submitted(request, "login") or _submitted(request, "username")


def signed_in_account(request) -> str | None:
    user = getattr(request, "user", None)
    return f"user:{user.pk}" if user is not None and user.is_authenticated else None


class RateThrottle(BaseThrottle):
    """A DRF throttle counting one scope; subclasses say whose requests are counted together."""

    scope: str = ""
    methods: tuple[str, ...] = ("POST",)
    per = "address"

    def ident(self, request, view) -> str | None:
        return client_rate_key(request)

    def allow_request(self, request, view):
        self._wait = None
        if request.method not in self.methods:
            return True
        ident = self.ident(request, view)
        if ident is None:
            return True
        self._wait = consume(self.scope, ident)
        return self._wait is None

    def wait(self):
        return self._wait


def per_address(scope: str, *, methods: tuple[str, ...] = ("POST",)) -> type[RateThrottle]:
    """A throttle class counting requests per client address (see ``core.client_ip``)."""
    return type(f"{scope.title().replace('_', '')}AddressThrottle", (RateThrottle,),
                {"scope": scope, "methods": methods, "__module__": __name__})


def per_account(scope: str, ident: Callable, *, methods: tuple[str, ...] = ("POST",)) -> type[RateThrottle]:
    """A throttle class counting requests per account; ``ident(request)`` names it (None: not counted)."""
    return type(f"{scope.title().replace('_', '')}AccountThrottle", (RateThrottle,),
                {"scope": scope, "methods": methods, "per": "account", "__module__": __name__,
                 "ident": lambda self, request, view: ident(request)})


def too_many_requests(request, wait: int, *, per: str):
    """The 429 page of a plain Django view, with ``Retry-After``."""
    whom = "from your address" if per == "address" else "for this account"
    response = render(request, "429.html", {"wait": wait, "whom": whom}, status=429)
    response["Retry-After"] = str(wait)
    return response


def rate_limited(*limits: tuple[str, Callable, str], methods: tuple[str, ...] = ("POST",)):
    """Decorate a Django view with limits ``(scope, ident(request), "address" | "account")``.

    Only ``methods`` are counted (showing a form is free; submitting it is not). The first limit that is
    exceeded answers 429 with ``Retry-After``; the view does not run.
    """

    def decorator(view):
        @wraps(view)
        def wrapped(request, *args, **kwargs):
            if request.method in methods:
                for scope, ident, per in limits:
                    key = ident(request)
                    if key is None:
                        continue
                    wait = consume(scope, key)
                    if wait is not None:
                        return too_many_requests(request, wait, per=per)
            return view(request, *args, **kwargs)

        return wrapped

    return decorator
