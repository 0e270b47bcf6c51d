"""Reads of the worker registry. Live state comes from presence in the cache, fetched for a whole page at
once (``cache.get_many``), so a page's query count does not grow with its rows."""

from __future__ import annotations

from decimal import Decimal

from django.contrib.auth import get_user_model
from django.db.models import Count, DecimalField, Q, QuerySet, Sum, Value
from django.db.models.functions import Coalesce

from marketplace import presence
from marketplace.models import CreditGrant, EnrollmentToken, Worker

# "unknown": the cache holding presence is down, so whether an active worker is online cannot be told.
LIVE_STATES = ("online", "busy", "paused", "offline", "suspended", "revoked", "unknown")
_PRESENCE_TO_LIVE = {"idle": "online", "busy": "busy", "paused": "paused"}
_ZERO = Value(Decimal("0"), output_field=DecimalField(max_digits=20, decimal_places=4))


def live_state_from(worker: Worker, value: dict | None) -> str:
    if worker.status == Worker.Status.REVOKED:
        return "revoked"
    if worker.status == Worker.Status.SUSPENDED:
        return "suspended"
    if value is None:
        return "offline"
    return _PRESENCE_TO_LIVE.get(value.get("state"), "online")


def worker_live_state(worker: Worker) -> str:
    """One of online (idle), busy, paused, offline, suspended, revoked, unknown (cache down)."""
    if worker.status != Worker.Status.ACTIVE:
        return live_state_from(worker, None)
    found = presence.presence_get_many([worker.pk])
    return live_state_from(worker, found.get(worker.pk)) if found.known else "unknown"


def with_live_state(workers) -> list[Worker]:
    """Attach ``live_state`` and ``presence`` to each worker, with one cache round trip for all of them."""
    workers = list(workers)
    found = presence.presence_get_many(w.pk for w in workers if w.status == Worker.Status.ACTIVE)
    for worker in workers:
        worker.presence = found.get(worker.pk)
        unknown = not found.known and worker.status == Worker.Status.ACTIVE
        worker.live_state = "unknown" if unknown else live_state_from(worker, worker.presence)
    return workers


def _with_credits(qs: QuerySet[Worker]) -> QuerySet[Worker]:
    return qs.annotate(credits=Coalesce(Sum("credit_grants__amount"), _ZERO))


def worker_list_public() -> QuerySet[Worker]:
    """Workers shown in the public pool: everything but revoked ones, with owner and credits."""
    return _with_credits(Worker.objects.exclude(status=Worker.Status.REVOKED).select_related("owner")).order_by(
        "-created_at", "-id"
    )


def worker_list_for_owner(*, user) -> list[Worker]:
    return with_live_state(_with_credits(Worker.objects.filter(owner=user).select_related("owner")).order_by(
        "-created_at", "-id"
    ))


def worker_get(*, worker_id: int) -> Worker | None:
    return _with_credits(Worker.objects.filter(pk=worker_id).select_related("owner")).first()


def workers_available(*, min_vram_mb: int, allow_cpu: bool) -> list[Worker]:
    """Active workers whose presence says idle and that meet the hardware requirements: a worker without
    GPUs qualifies only when ``allow_cpu``; one with GPUs when its largest GPU has ≥ ``min_vram_mb``.
    Most reliable first, then fastest."""
    candidates = list(Worker.objects.filter(status=Worker.Status.ACTIVE).select_related("owner"))
    found = presence.presence_get_many(w.pk for w in candidates)
    out = []
    for worker in candidates:
        value = found.get(worker.pk)
        if value is None or value.get("state") != "idle":
            continue
        if worker.gpu_count == 0:
            if not allow_cpu:
                continue
        elif worker.max_vram_mb < min_vram_mb:
            continue
        worker.presence = value
        worker.live_state = "online"
        out.append(worker)
    out.sort(key=lambda w: (-w.reliability, -w.benchmark_tflops, w.pk))
    return out


def member_credits(*, user) -> Decimal:
    """Total compute credits granted to the member's workers."""
    if user is None or not getattr(user, "is_authenticated", False):
        return Decimal("0")
    total = CreditGrant.objects.filter(worker__owner=user).aggregate(total=Sum("amount"))["total"]
    return total or Decimal("0")


def member_compute(*, user) -> dict:
    """For the profile page: the member's credits and workers (with live state)."""
    return {"credits": member_credits(user=user), "workers": worker_list_for_owner(user=user)}


def pool_totals() -> dict:
    """Workers, GPUs, VRAM and measured TFLOPS of the workers online right now (idle, busy or paused)."""
    rows = list(Worker.objects.filter(status=Worker.Status.ACTIVE).only("id", "gpus", "benchmark_tflops"))
    found = presence.presence_get_many(w.pk for w in rows)
    online = [w for w in rows if w.pk in found]
    return {
        "workers_registered": len(rows),
        "workers_online": len(online),
        "workers_busy": sum(1 for w in online if found[w.pk].get("state") == "busy"),
        "gpus_online": sum(w.gpu_count for w in online),
        "vram_online_mb": sum(w.total_vram_mb for w in online),
        "tflops_online": round(sum(w.benchmark_tflops for w in online), 2),
    }


def home_summary() -> dict:
    return {"workers_online": pool_totals()["workers_online"]}


def credit_leaderboard(*, limit: int = 10) -> list:
    """Members ranked by the compute credits their workers earned."""
    return list(
        get_user_model()
        .objects.annotate(
            credits=Coalesce(Sum("workers__credit_grants__amount"), _ZERO),
            worker_count=Count("workers", distinct=True),
        )
        .filter(credits__gt=0)
        .order_by("-credits", "username")[:limit]
    )


def credit_grants_for_worker(*, worker: Worker, limit: int = 20) -> list[CreditGrant]:
    return list(CreditGrant.objects.filter(worker=worker).order_by("-created_at", "-id")[:limit])


def enrollment_tokens_pending(*, user) -> list[EnrollmentToken]:
    from django.utils import timezone

    return list(EnrollmentToken.objects.filter(owner=user, used_at__isnull=True, expires_at__gt=timezone.now()))


def worker_counts_by_status() -> dict:
    return Worker.objects.aggregate(
        active=Count("id", filter=Q(status=Worker.Status.ACTIVE)),
        suspended=Count("id", filter=Q(status=Worker.Status.SUSPENDED)),
        revoked=Count("id", filter=Q(status=Worker.Status.REVOKED)),
    )
