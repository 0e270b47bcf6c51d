"""Every write of the worker registry. Each state change appends its ledger entry in the same transaction.

Secrets (enrollment and worker tokens) are returned once by the service that creates them and stored only
as sha256 digests; they never appear in the ledger.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from django.conf import settings
from django.core.cache import cache
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from core.notifications import notify_users
from ledger.services import entry_append
from marketplace import presence
from marketplace.errors import (
    EnrollmentTokenExpired,
    EnrollmentTokenInvalid,
    EnrollmentTokenUsed,
    MarketplaceError,
    WorkerPermissionDenied,
    WorkerStateError,
)
from marketplace.models import CreditGrant, EnrollmentToken, Worker, WorkerOutcome

SWEEP_ONLINE_KEY = "presence:sweep-online"


@dataclass(frozen=True)
class NewSecret:
    """A freshly created secret: shown to its owner once, stored only as a digest."""

    token: str
    record: object


# --- enrollment ---------------------------------------------------------------------------------


@transaction.atomic
def enrollment_token_create(*, owner, name: str = "") -> NewSecret:
    """A single-use enrollment token for ``owner``, valid for ``AGORA_ENROLLMENT_TOKEN_TTL``."""
    if not owner.is_authenticated or not owner.is_active:
        raise WorkerPermissionDenied("only an active member can add a worker")
    token = "enr_" + secrets.token_urlsafe(24)
    now = timezone.now()
    record = EnrollmentToken.objects.create(
        owner=owner,
        name=name.strip()[:100],
        token_hash=presence.token_hash(token),
        created_at=now,
        expires_at=now + settings.AGORA_ENROLLMENT_TOKEN_TTL,
    )
    return NewSecret(token=token, record=record)


def _hardware_summary(worker: Worker) -> dict:
    return {
        "gpus": [{"name": g["name"], "memory_mb": g["memory_mb"]} for g in worker.gpus],
        "cpu_count": worker.cpu_count,
        "memory_mb": worker.memory_mb,
        "torch": worker.torch_version,
        "cuda": worker.cuda_version or None,
        "benchmark_tflops": worker.benchmark_tflops,
        "benchmark_mem_gbps": worker.benchmark_mem_gbps,
        "agent_version": worker.agent_version,
    }


@transaction.atomic
def worker_enroll(
    *, enrollment_token: str, name: str, hardware: dict, benchmark: dict, agent_version: str
) -> NewSecret:
    """Turn a valid, unused, unexpired enrollment token into a worker and its worker token.

    The token row is locked (``SELECT … FOR UPDATE``; SQLite's IMMEDIATE transactions serialise writers)
    and marked used with a conditional update, so two agents racing with the same token get one worker.
    Inputs are already validated by the API serializer (shape, ranges, finite numbers).
    """
    digest = presence.token_hash(enrollment_token or "")
    token = EnrollmentToken.objects.select_for_update().select_related("owner").filter(token_hash=digest).first()
    if token is None or not token.owner.is_active:
        raise EnrollmentTokenInvalid()
    now = timezone.now()
    if token.used_at is not None:
        raise EnrollmentTokenUsed()
    if token.is_expired(now):
        raise EnrollmentTokenExpired()
    if EnrollmentToken.objects.filter(pk=token.pk, used_at__isnull=True).update(used_at=now) != 1:
        raise EnrollmentTokenUsed()

    for value in (benchmark["tflops"], benchmark["mem_gbps"]):
        if not math.isfinite(value) or value < 0:  # the serializer checks this too; the database must not see NaN
            raise MarketplaceError("benchmark figures must be finite and non-negative", code="invalid")
    worker_token = "wkr_" + secrets.token_urlsafe(32)
    worker = Worker.objects.create(
        owner=token.owner,
        name=name.strip()[:100],
        gpus=[{"name": str(g["name"])[:100], "memory_mb": int(g["memory_mb"])} for g in hardware.get("gpus", [])],
        cpu_count=hardware["cpu_count"],
        memory_mb=hardware["memory_mb"],
        torch_version=hardware.get("torch") or "",
        cuda_version=hardware.get("cuda") or "",
        benchmark_tflops=float(benchmark["tflops"]),
        benchmark_mem_gbps=float(benchmark["mem_gbps"]),
        agent_version=agent_version,
        token_hash=presence.token_hash(worker_token),
        created_at=now,
    )
    EnrollmentToken.objects.filter(pk=token.pk).update(worker=worker)
    entry_append(
        actor=token.owner,
        action="worker.enrolled",
        subject=worker.ledger_label,
        payload={"worker_id": worker.pk, "name": worker.name, "owner": token.owner.get_username(),
                 "hardware": _hardware_summary(worker)},
    )
    return NewSecret(token=worker_token, record=worker)


# --- status: revoke, suspend, reinstate ----------------------------------------------------------


def _locked(worker: Worker) -> Worker:
    return Worker.objects.select_for_update().select_related("owner").get(pk=worker.pk)


def _set_status(worker: Worker, status: str, reason: str) -> Worker:
    worker.status = status
    worker.status_reason = reason
    worker.status_changed_at = timezone.now()
    worker.save(update_fields=["status", "status_reason", "status_changed_at"])
    presence.token_cache_forget(worker.token_hash)
    return worker


@transaction.atomic
def worker_revoke(*, worker: Worker, by) -> Worker:
    """The owner withdraws a worker: its token stops working at once (401) and for good."""
    worker = _locked(worker)
    if not by.is_authenticated or by.pk != worker.owner_id:
        raise WorkerPermissionDenied("only the worker's owner can revoke its token")
    if worker.status == Worker.Status.REVOKED:
        raise WorkerStateError("this worker's token is already revoked")
    _set_status(worker, Worker.Status.REVOKED, "revoked by its owner")
    presence.presence_forget(worker.pk)
    entry_append(actor=by, action="worker.revoked", subject=worker.ledger_label,
                 payload={"worker_id": worker.pk, "name": worker.name})
    return worker


@transaction.atomic
def worker_suspend(*, worker: Worker, by, reason: str) -> Worker:
    """An administrator stops a worker from taking work (403 ``worker_suspended`` on every call)."""
    worker = _locked(worker)
    if not by.is_authenticated or not by.is_staff:
        raise WorkerPermissionDenied("only administrators can suspend a worker")
    reason = (reason or "").strip()
    if not reason:
        raise MarketplaceError("reason: a reason is required to suspend a worker", code="invalid")
    if worker.status != Worker.Status.ACTIVE:
        raise WorkerStateError(f"only an active worker can be suspended, not a {worker.status} one")
    return _suspend(worker, actor=by, reason=reason)


def _suspend(worker: Worker, *, actor, reason: str, **extra) -> Worker:
    _set_status(worker, Worker.Status.SUSPENDED, reason[:1000])
    presence.presence_forget(worker.pk)
    entry_append(actor=actor, action="worker.suspended", subject=worker.ledger_label,
                 payload={"worker_id": worker.pk, "name": worker.name, "reason": worker.status_reason, **extra})
    notify_users(user_ids=[worker.owner_id], kind="worker_suspended",
                 text=f"Your worker {worker.name} was suspended: {worker.status_reason}"[:300],
                 url=f"/workers/{worker.pk}/")
    return worker


def suspension_threshold() -> tuple[float, int]:
    """(reliability under which a worker is suspended automatically, results it must have first)."""
    return (float(getattr(settings, "AGORA_SUSPEND_BELOW_RELIABILITY", 0.2)),
            int(getattr(settings, "AGORA_SUSPEND_AFTER_TASKS", 5)))


@transaction.atomic
def worker_suspend_if_unreliable(*, worker: Worker) -> bool:
    """Suspend an active worker whose reliability fell under ``AGORA_SUSPEND_BELOW_RELIABILITY`` after at least
    ``AGORA_SUSPEND_AFTER_TASKS`` recorded results; the ledger's ``worker.suspended`` entry is by the system,
    marked ``automatic``, with the reliability and counts that decided it. Returns whether it suspended."""
    below, after = suspension_threshold()
    worker = _locked(worker)
    results = worker.tasks_valid + worker.tasks_invalid
    if worker.status != Worker.Status.ACTIVE or below <= 0 or results < after or not worker.reliability < below:
        return False
    reason = (f"suspended automatically: reliability {worker.reliability:.3f} fell under {below:g} after "
              f"{results} results ({worker.tasks_invalid} invalid)")
    _suspend(worker, actor="system", reason=reason, automatic=True, reliability=round(worker.reliability, 6),
             tasks_valid=worker.tasks_valid, tasks_invalid=worker.tasks_invalid)
    return True


@transaction.atomic
def worker_reinstate(*, worker: Worker, by) -> Worker:
    """An administrator lifts a suspension."""
    worker = _locked(worker)
    if not by.is_authenticated or not by.is_staff:
        raise WorkerPermissionDenied("only administrators can reinstate a worker")
    if worker.status != Worker.Status.SUSPENDED:
        raise WorkerStateError(f"only a suspended worker can be reinstated, not a {worker.status} one")
    _set_status(worker, Worker.Status.ACTIVE, "")
    entry_append(actor=by, action="worker.reinstated", subject=worker.ledger_label,
                 payload={"worker_id": worker.pk, "name": worker.name})
    return worker


# --- presence -----------------------------------------------------------------------------------


def worker_heartbeat(*, worker: Worker, state: str, task_id: int | None = None,
                     progress: float | None = None) -> dict:
    """Record that ``worker`` is alive. Writes the cache only, never the database: ``last_seen_at`` is
    persisted in bulk by ``worker_sweep_offline``."""
    return presence.presence_record(worker.pk, state=state, task_id=task_id, progress=progress)


def worker_sweep_offline() -> dict:
    """Persist ``last_seen_at`` for workers seen since the last sweep (one ``bulk_update``) and work out who
    went offline since then. Idempotent: a second run finds nothing newer to write."""
    from datetime import UTC, datetime

    rows = list(Worker.objects.filter(status=Worker.Status.ACTIVE).values_list("id", "last_seen_at"))
    seen = presence.presence_get_many(worker_id for worker_id, _ in rows)
    if not seen.known:  # the cache is down: who is online cannot be told, so nothing changes
        return {"persisted": 0, "online": 0, "went_offline": [], "came_online": [], "presence_unknown": True}
    changed = []
    for worker_id, last_seen_at in rows:
        value = seen.get(worker_id)
        if value is None:
            continue
        at = datetime.fromtimestamp(float(value["at"]), tz=UTC)
        if last_seen_at is None or at > last_seen_at:
            changed.append(Worker(id=worker_id, last_seen_at=at))
    if changed:
        Worker.objects.bulk_update(changed, ["last_seen_at"], batch_size=1000)
    online_now = sorted(seen)
    before = cache.get(SWEEP_ONLINE_KEY) or []
    went_offline = sorted(set(before) - set(online_now))
    came_online = sorted(set(online_now) - set(before))
    cache.set(SWEEP_ONLINE_KEY, online_now, timeout=None)
    if went_offline:
        for worker_id, owner_id, name in Worker.objects.filter(pk__in=went_offline).values_list("id", "owner", "name"):
            notify_users(user_ids=[owner_id], kind="worker_offline",
                         text=f"Your worker {name} went offline", url=f"/workers/{worker_id}/")
    return {"persisted": len(changed), "online": len(online_now), "went_offline": went_offline,
            "came_online": came_online}


# --- reputation and credits ---------------------------------------------------------------------


@transaction.atomic
def worker_record_outcome(*, worker: Worker, valid: bool, reference: str) -> Worker:
    """Move reliability towards 1 (valid) or 0 (invalid): ``r ← 0.9·r + 0.1·valid``, like BOINC's decaying
    error rate. Recorded once per ``reference``: calling again for the same task changes nothing. An invalid
    result that takes reliability under the threshold suspends the worker (``worker_suspend_if_unreliable``)."""
    if not reference:
        raise MarketplaceError("reference: a reference (e.g. task:17) is required", code="invalid")
    worker = Worker.objects.select_for_update().get(pk=worker.pk)
    if WorkerOutcome.objects.filter(worker=worker, reference=reference).exists():
        return worker
    decay = Worker.RELIABILITY_DECAY
    worker.reliability = min(1.0, max(0.0, decay * worker.reliability + (1 - decay) * (1.0 if valid else 0.0)))
    if valid:
        worker.tasks_valid = F("tasks_valid") + 1
    else:
        worker.tasks_invalid = F("tasks_invalid") + 1
    worker.save(update_fields=["reliability", "tasks_valid" if valid else "tasks_invalid"])
    worker.refresh_from_db(fields=["tasks_valid", "tasks_invalid"])
    WorkerOutcome.objects.create(worker=worker, reference=reference, valid=valid,
                                 reliability_after=worker.reliability)
    if not valid:
        worker_suspend_if_unreliable(worker=worker)
        worker.refresh_from_db(fields=["status", "status_reason", "status_changed_at"])
    return worker


def credit_grant(*, worker: Worker, amount: Decimal, reason: str, reference: str) -> CreditGrant:
    """Grant compute credits for one accepted contribution. Append-only and idempotent per
    ``(worker, reference)``: a second grant with the same reference returns the first and does nothing
    (the unique constraint decides, so concurrent callers cannot both grant)."""
    try:
        amount = Decimal(amount)
    except (InvalidOperation, TypeError, ValueError) as exc:
        raise MarketplaceError("amount: not a number", code="invalid") from exc
    if not amount.is_finite() or amount <= 0:
        raise MarketplaceError("amount: credits must be a positive number", code="invalid")
    if not reference:
        raise MarketplaceError("reference: a reference (e.g. task:17) is required", code="invalid")
    existing = CreditGrant.objects.filter(worker_id=worker.pk, reference=reference).first()
    if existing is not None:
        return existing
    try:
        return _credit_grant_new(worker=worker, amount=amount, reason=reason, reference=reference)
    except IntegrityError:
        return CreditGrant.objects.get(worker_id=worker.pk, reference=reference)


@transaction.atomic
def _credit_grant_new(*, worker: Worker, amount: Decimal, reason: str, reference: str) -> CreditGrant:
    grant = CreditGrant.objects.create(worker_id=worker.pk, amount=amount.quantize(Decimal("0.0001")),
                                       reason=reason[:200], reference=reference[:100])
    entry_append(actor="system", action="credit.granted", subject=f"worker:{worker.pk}",
                 payload={"worker_id": worker.pk, "amount": str(grant.amount), "reason": grant.reason,
                          "reference": grant.reference})
    return grant
