"""Celery tasks driving training runs. Each takes ids, calls services, and is safe to run twice."""

from __future__ import annotations

import logging

from celery import shared_task
from celery.signals import worker_process_init
from django.db import transaction

from diloco.models import warm_up
from training import services

_LIMITS = {"acks_late": True, "ignore_result": True}

log = logging.getLogger(__name__)


def enqueue(task, *args) -> bool:
    """Send ``task`` now; a broker outage is logged, never raised, so the web call or service that asked
    does not fail: the beat's ``training.tick`` finds the same work within seconds. Returns whether sent."""
    try:
        task.delay(*args)
    except Exception:
        log.exception("could not enqueue %s%s; the next tick will catch up", task.name, args)
        return False
    return True


@worker_process_init.connect
def _warm_up_worker_process(**_kwargs) -> None:
    """A worker process's first round aggregation should not be the one to load torch's meta-device
    support (see ``diloco.models.warm_up``)."""
    warm_up()


@shared_task(name="training.start_run", soft_time_limit=240, time_limit=300, **_LIMITS)
def start_run(proposal_id: int) -> int | None:
    run = services.run_start(proposal_id=proposal_id)
    return run.pk if run else None


@shared_task(name="training.round_check", soft_time_limit=services.AGGREGATION_STALE_S - 120,
             time_limit=services.AGGREGATION_STALE_S - 60, **_LIMITS)
def round_check(round_id: int) -> bool:
    """Take over a lapsed aggregation, expire late tasks, extend or fail a starved round; when the round is
    ready, aggregate it right here (the service is exactly-once)."""
    if services.round_check(round_id=round_id):
        return services.round_aggregate(round_id=round_id) is not None
    return False


@shared_task(name="training.aggregate_round", soft_time_limit=services.AGGREGATION_STALE_S - 120,
             time_limit=services.AGGREGATION_STALE_S - 60, **_LIMITS)
def aggregate_round(round_id: int) -> bool:
    return services.round_aggregate(round_id=round_id) is not None


@shared_task(name="training.tick", soft_time_limit=50, time_limit=60, **_LIMITS)
def tick() -> dict:
    """The beat's sweep: start approved runs, re-open aggregations whose lease lapsed, expire late tasks,
    extend or fail starved rounds, and hand ready rounds to ``training.aggregate_round``."""
    started = services.runs_start_approved()
    released = services.rounds_release_stale()
    ready = [rid for rid in services.rounds_open_ids() if services.round_check(round_id=rid)]
    for rid in ready:
        transaction.on_commit(lambda rid=rid: enqueue(aggregate_round, rid))
    return {"started": started, "released": released, "ready": ready}


@shared_task(name="training.sweep_blobs", soft_time_limit=240, time_limit=300, **_LIMITS)
def sweep_blobs() -> int:
    """Remove the temporary files of blob writes that were killed (``blobs.blob_sweep_temp``: never a live
    write's) and bound the export cache (``export.export_sweep``). Returns how many files and export
    directories went."""
    from django.conf import settings

    from training import blobs, export

    removed = len(blobs.blob_sweep_temp())
    return removed + export.export_sweep(keep=settings.AGORA_EXPORT_CACHE_KEEP,
                                         max_age_s=settings.AGORA_EXPORT_CACHE_MAX_AGE_H * 3600)
