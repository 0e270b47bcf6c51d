"""Celery tasks of the worker registry."""

from __future__ import annotations

import logging

from celery import shared_task

from marketplace.services import worker_sweep_offline

log = logging.getLogger(__name__)


@shared_task(name="marketplace.sweep_offline", soft_time_limit=60, time_limit=90, ignore_result=True)
def sweep_offline() -> dict:
    """Beat task: persist ``last_seen_at`` for workers that sent heartbeats since the last sweep and note
    who went offline. Idempotent; safe to run late, twice or concurrently (last write wins with the
    same timestamps)."""
    result = worker_sweep_offline()
    if result["went_offline"]:
        log.info("workers went offline: %s", result["went_offline"])
    return result
