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
"""

from __future__ import annotations

import hashlib
import time

from django.conf import settings
from django.core.cache import cache, caches
from django.core.cache.backends.redis import RedisCache
from django.db import transaction

TOKEN_CACHE_S = 120
PRESENCE_PREFIX = "presence:"
TOKEN_PREFIX = "wtok:"


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
    value = {"state": state, "task_id": task_id, "progress": progress, "at": time.time()}
    fast = fast_redis()
    if fast is not None:
        fast.set(presence_key(worker_id), value, settings.AGORA_OFFLINE_AFTER_S)
    else:
        cache.set(presence_key(worker_id), value, timeout=settings.AGORA_OFFLINE_AFTER_S)
    return value


def _fresh(value) -> dict | None:
    if not isinstance(value, dict):
        return None
    if time.time() - float(value.get("at", 0)) > settings.AGORA_OFFLINE_AFTER_S:
        return None
    return value


def presence_get(worker_id: int) -> dict | None:
    return _fresh(cache.get(presence_key(worker_id)))


def presence_get_many(worker_ids) -> dict[int, dict]:
    """Presence of many workers in one cache round trip: ``{worker_id: presence}`` for those online."""
    ids = list(worker_ids)
    if not ids:
        return {}
    found = cache.get_many([presence_key(i) for i in ids])
    out: dict[int, dict] = {}
    for worker_id in ids:
        value = _fresh(found.get(presence_key(worker_id)))
        if value is not None:
            out[worker_id] = value
    return out


def presence_forget(worker_id: int) -> None:
    cache.delete(presence_key(worker_id))


def token_cache_get(digest: str) -> dict | None:
    fast = fast_redis()
    facts = fast.get(TOKEN_PREFIX + digest) if fast is not None else cache.get(TOKEN_PREFIX + digest)
    if not isinstance(facts, dict) or time.time() - facts.get("cached_at", 0) > TOKEN_CACHE_S:
        return None
    return facts


def token_cache_set(digest: str, facts: dict) -> None:
    cache.set(TOKEN_PREFIX + digest, {**facts, "cached_at": time.time()}, timeout=TOKEN_CACHE_S)


def token_cache_forget(digest: str) -> None:
    """Forget now, and again once the status change commits (a request that read the old row between the
    two could otherwise put it back)."""
    cache.delete(TOKEN_PREFIX + digest)
    transaction.on_commit(lambda: cache.delete(TOKEN_PREFIX + digest))
