"""Worker presence and the worker-token cache: the heartbeat hot path, kept out of the database.

Presence is a cache entry ``presence:<worker_id>`` -> ``{"state", "task_id", "progress", "at"}`` written by
every heartbeat with a time-to-live of ``AGORA_OFFLINE_AFTER_S``: a worker whose entry expired is offline.
``at`` (Unix seconds) is checked as well, so a cache that keeps entries a little longer than asked cannot
make a silent worker look alive. Values are plain dicts of numbers and strings.

The token cache maps ``sha256(worker token)`` -> the few facts authentication needs (worker id, owner,
status) for ``TOKEN_CACHE_S`` seconds, so a heartbeat costs no SQL once warm. Every service that changes
a worker's status forgets its entry (immediately and again on commit), so revocation and suspension take
effect at once; the time limit only bounds changes made outside the services (an owner deactivated in the
admin). It is longer than the heartbeat interval on purpose: with a 30 s interval and a 30 s cache every
heartbeat of an agent would find its entry just expired.

Everything here fails soft when the cache is down (``CACHE_ERRORS``), so a Redis outage never fails a
worker call: presence writes are dropped, presence reads say "unknown" (``PresenceMap.known`` is False;
not "offline"), token lookups miss and authentication reads the database. Each failure is logged as a
warning, at most once per ``_WARN_EVERY_S`` per process so an outage does not flood the log. A cache that
was only unreachable (not restarted empty) may still hold a revoked worker's token facts afterwards, for
at most ``TOKEN_CACHE_S``.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time

from django.conf import settings
from django.core.cache import cache, caches
from django.core.cache.backends.redis import RedisCache
from django.db import transaction

TOKEN_CACHE_S = 120
PRESENCE_PREFIX = "presence:"
TOKEN_PREFIX = "wtok:"

log = logging.getLogger(__name__)

try:
    from redis.exceptions import RedisError
except ImportError:  # the embedded default needs no Redis client
    RedisError = OSError

# What a cache that is down or unreachable raises: redis-py's connection and timeout errors, and OSError
# from the file-based cache (disk full, permissions).
CACHE_ERRORS: tuple[type[Exception], ...] = (RedisError, OSError)

_WARN_EVERY_S = 30.0
_warned_at = 0.0
_warn_lock = threading.Lock()


def cache_down(what: str, exc: BaseException) -> None:
    """Log that the cache failed while doing ``what`` (rate limited: one warning per interval)."""
    global _warned_at
    now = time.monotonic()
    with _warn_lock:
        if now - _warned_at < _WARN_EVERY_S:
            return
        _warned_at = now
    log.warning("cache unavailable (%s: %s); %s, carrying on without it", exc.__class__.__name__, exc, what)


class PresenceMap(dict):
    """``{worker_id: presence}`` of the workers online; ``known`` is False when the cache could not be
    read, and then the map is empty because presence is unknown, not because everyone is offline."""

    known = True


def _unknown() -> PresenceMap:
    found = PresenceMap()
    found.known = False
    return found


class _FastRedis:
    """Direct access to the default cache's Redis for the heartbeat hot path.

    Django's ``RedisCache`` builds a new ``redis.Redis`` client object for every operation, which costs
    more CPU than the round trip itself; this keeps one per cache instance (Django keeps one cache instance
    per thread) over the same connection pool, with the same key format and serializer, so values written
    here are read by ``cache.get`` and the other way round.
    """

    def __init__(self, backend: RedisCache):
        inner = backend._cache
        self.backend = backend
        self.client = inner._client(connection_pool=inner._get_connection_pool(write=True))
        self.serializer = inner._serializer

    def key(self, key: str) -> str:
        return self.backend.make_and_validate_key(key)

    def get(self, key: str):
        raw = self.client.get(self.key(key))
        return None if raw is None else self.serializer.loads(raw)

    def set(self, key: str, value, timeout: int) -> None:
        self.client.set(self.key(key), self.serializer.dumps(value), ex=timeout)


def fast_redis() -> _FastRedis | None:
    """The default cache's ``_FastRedis`` when it is Redis, else None (callers use the cache API)."""
    backend = caches["default"]
    if not isinstance(backend, RedisCache):
        return None
    fast = backend.__dict__.get("_agora_fast")
    if fast is None:
        fast = backend.__dict__["_agora_fast"] = _FastRedis(backend)
    return fast


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def presence_key(worker_id: int) -> str:
    return f"{PRESENCE_PREFIX}{worker_id}"


def presence_record(worker_id: int, *, state: str, task_id: int | None, progress: float | None) -> dict:
    """Store the worker's presence and return it; when the cache is down it is returned unstored."""
    value = {"state": state, "task_id": task_id, "progress": progress, "at": time.time()}
    try:
        fast = fast_redis()
        if fast is not None:
            fast.set(presence_key(worker_id), value, settings.AGORA_OFFLINE_AFTER_S)
        else:
            cache.set(presence_key(worker_id), value, timeout=settings.AGORA_OFFLINE_AFTER_S)
    except CACHE_ERRORS as exc:
        cache_down("presence not recorded", exc)
    return value


def _fresh(value) -> dict | None:
    if not isinstance(value, dict):
        return None
    if time.time() - float(value.get("at", 0)) > settings.AGORA_OFFLINE_AFTER_S:
        return None
    return value


def presence_get(worker_id: int) -> dict | None:
    """The worker's presence, or None when it is offline or (cache down) unknown."""
    return presence_get_many([worker_id]).get(worker_id)


def presence_get_many(worker_ids) -> PresenceMap:
    """Presence of many workers in one cache round trip: ``{worker_id: presence}`` for those online
    (``known`` is False when the cache is down)."""
    ids = list(worker_ids)
    if not ids:
        return PresenceMap()
    try:
        found = cache.get_many([presence_key(i) for i in ids])
    except CACHE_ERRORS as exc:
        cache_down("presence unknown", exc)
        return _unknown()
    out = PresenceMap()
    for worker_id in ids:
        value = _fresh(found.get(presence_key(worker_id)))
        if value is not None:
            out[worker_id] = value
    return out


def _delete_soft(key: str, what: str) -> None:
    try:
        cache.delete(key)
    except CACHE_ERRORS as exc:
        cache_down(what, exc)


def presence_forget(worker_id: int) -> None:
    _delete_soft(presence_key(worker_id), "presence not cleared")


def token_cache_get(digest: str) -> dict | None:
    """The cached facts of a token, or None (not cached, too old, or the cache is down)."""
    try:
        fast = fast_redis()
        facts = fast.get(TOKEN_PREFIX + digest) if fast is not None else cache.get(TOKEN_PREFIX + digest)
    except CACHE_ERRORS as exc:
        cache_down("worker tokens are checked against the database", exc)
        return None
    if not isinstance(facts, dict) or time.time() - facts.get("cached_at", 0) > TOKEN_CACHE_S:
        return None
    return facts


def token_cache_set(digest: str, facts: dict) -> None:
    try:
        cache.set(TOKEN_PREFIX + digest, {**facts, "cached_at": time.time()}, timeout=TOKEN_CACHE_S)
    except CACHE_ERRORS as exc:
        cache_down("worker tokens are checked against the database", exc)


def token_cache_forget(digest: str) -> None:
    """Forget now, and again once the status change commits (a request that read the old row between the
    two could otherwise put it back). A cache that is down cannot be told; see the module docstring."""
    _delete_soft(TOKEN_PREFIX + digest, "token facts not forgotten")
    transaction.on_commit(lambda: _delete_soft(TOKEN_PREFIX + digest, "token facts not forgotten"))
