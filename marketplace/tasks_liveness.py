"""Whether the task an agent names in its heartbeat is still wanted, without marketplace importing training.

The heartbeat reply tells an agent to stop a task that is no longer live for it (expired, failed, its run
canceled or failed, its round already aggregated, not its task), so it stops training at once instead of
at its next upload. Marketplace cannot import training, so the answer comes from two places that training
fills in:

- a cache marker per task (``task-live:<id>``), written by training after each change of a task's state
  commits: ``{"w": worker_id, "d": deadline (Unix seconds) or None}`` while live, ``{"w": ..., "stop":
  reason}`` once not. Reading it is one cache round trip, so a warm heartbeat still costs no SQL;
- a database hook, ``register(fn)``, that training registers in its ``AppConfig.ready``:
  ``fn(task_id, worker_id) -> reason or None``. It answers when the marker is absent (evicted, never
  written, or the cache is down) and writes the marker again.

Every cache call fails soft: a cache outage costs a query, never an error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from django.core.cache import cache

from marketplace import presence

log = logging.getLogger(__name__)

MARKER_PREFIX = "task-live:"
# A live marker outlives its task's deadline a little; a stop marker lasts as long as an agent could
# plausibly keep naming the task.
LIVE_GRACE_S = 300
STOP_TTL_S = 6 * 3600

_hooks: list[Callable[[int, int], str | None]] = []


def register(fn: Callable[[int, int], str | None]) -> None:
    """Register the database answer: ``fn(task_id, worker_id)`` returns why the task is not live for that
    worker, or None when it is. Registering the same function twice has no effect."""
    if fn not in _hooks:
        _hooks.append(fn)


def _key(task_id: int) -> str:
    return f"{MARKER_PREFIX}{task_id}"


def mark_live(*, task_id: int, worker_id: int, deadline: float | None) -> None:
    """The task is live for ``worker_id`` until ``deadline`` (Unix seconds; None: until told otherwise)."""
    ttl = STOP_TTL_S if deadline is None else max(60, int(deadline - time.time()) + LIVE_GRACE_S)
    try:
        cache.set(_key(task_id), {"w": worker_id, "d": deadline}, timeout=ttl)
    except Exception:  # the heartbeat falls back to the database hook
        log.warning("could not write the liveness marker of task %s", task_id, exc_info=True)


def mark_stopped(stops: dict[int, tuple[int | None, str]]) -> None:
    """``{task_id: (worker_id, reason)}``: these tasks are no longer live."""
    if not stops:
        return
    try:
        cache.set_many({_key(tid): {"w": wid, "stop": reason} for tid, (wid, reason) in stops.items()},
                       timeout=STOP_TTL_S)
    except Exception:
        log.warning("could not write the liveness markers of tasks %s", sorted(stops), exc_info=True)


def remember(*, task_id: int, worker_id: int | None, deadline: float | None, stop: str | None) -> None:
    """Write back what the database hook found, unless a marker appeared meanwhile: ``add`` never
    overwrites, so a state change that commits while the hook reads is not undone by its older answer."""
    if stop:
        value, ttl = {"w": worker_id, "stop": stop}, STOP_TTL_S
    else:
        value = {"w": worker_id, "d": deadline}
        ttl = STOP_TTL_S if deadline is None else max(60, int(deadline - time.time()) + LIVE_GRACE_S)
    try:
        cache.add(_key(task_id), value, timeout=ttl)
    except Exception:
        log.warning("could not write the liveness marker of task %s", task_id, exc_info=True)


def _from_marker(marker: dict, worker_id: int, now: float) -> str | None:
    if marker.get("w") != worker_id:
        return "this task is not assigned to this worker"
    if "stop" in marker:
        return str(marker["stop"])
    deadline = marker.get("d")
    if deadline is not None and now >= float(deadline):
        return "the task's deadline passed"
    return None


def stop_reason(*, task_id: int, worker_id: int) -> str | None:
    """Why ``task_id`` is no longer wanted from ``worker_id``, or None while it is."""
    try:
        fast = presence.fast_redis()
        marker = fast.get(_key(task_id)) if fast is not None else cache.get(_key(task_id))
    except Exception:
        log.warning("cache unavailable; asking the database whether task %s is live", task_id, exc_info=True)
        marker = None
    if isinstance(marker, dict):
        return _from_marker(marker, worker_id, time.time())
    for hook in _hooks:
        reason = hook(task_id, worker_id)
        if reason:
            return reason
    return None
