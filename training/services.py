"""Training services: runs from approved proposals, rounds, task claims and results, aggregation.

Heavy tensor work (initial weights, decoding, aggregating, evaluating, writing checkpoints) happens
outside database transactions; the transactions only lock a row, check its state and write the outcome.
Aggregation is made exactly-once by a claim token: a round moves ``open -> aggregating`` under a row
lock with a fresh token, the work happens unlocked, and the result is committed only if the round is
still ``aggregating`` with that same token. The claim is a lease (``AGORA_AGGREGATION_LEASE_S``) that
the aggregation renews from a keep-alive thread and at every phase boundary. A crashed aggregation's
lease lapses; the next round check or tick takes the round over, deletes the dead attempt's files and
aggregates again. A late finisher of the old attempt then finds a new token and commits nothing.

Rounds always make progress: a worker whose task failed or expired may take another task of the same
round; a round short of ``min_workers`` results is extended at most ``diloco.max_round_extensions``
times, then that attempt fails (``round.failed``) and the round is tried again, until the run has had
more than ``diloco.max_failed_rounds`` failed attempts and fails itself (``run.failed``).

Every change of a task's state tells ``marketplace.tasks_liveness`` after it commits, so a heartbeat
naming a task that is no longer wanted answers ``stop_task`` without a query.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal

import torch
from django.conf import settings
from django.db import IntegrityError, connections, transaction
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone
from rest_framework import serializers

from diloco.aggregate import aggregate, screen_updates, update_norms
from diloco.checkpoint import save_weights, sha256_hex
from diloco.codecs import CodecError, decode_update, payload_nbytes
from diloco.evaluate import eval_dtype, evaluate_loss
from diloco.models import build_model, init_state, model_with_weights
from diloco.outer import OuterOptimizer
from governance.models import Proposal
from governance.services import proposal_enact
from ledger.services import entry_append
from marketplace import tasks_liveness
from marketplace.services import credit_grant, worker_record_outcome
from training import blobs
from training.errors import (
    InvalidUpdate,
    NotYourTask,
    RunError,
    RunForbidden,
    TaskCompleted,
    TaskExpired,
    TaskNotOpen,
    TrainingError,
    UploadTooLarge,
)
from training.models import Checkpoint, CommunityModel, Round, Task, TrainingRun, checkpoint_storage_name

log = logging.getLogger(__name__)

# A step whose held-out loss rises by more than this fraction (or is not finite) is rejected.
EVAL_TOLERANCE = 0.10
# The longest an aggregation may run (Celery's time limits derive from it); a round still aggregating
# after this long without a lease (rows from before leases) is presumed dead.
AGGREGATION_STALE_S = 900
# Defaults of the spec's round-failure rules, for specs frozen before the rules existed.
DEFAULT_MAX_ROUND_EXTENSIONS = 3
DEFAULT_MAX_FAILED_ROUNDS = 2
EVAL_BATCHES = 8
# Screening: an update whose norm is this many times the median (this round's, or the last round's
# accepted updates') is rejected.
MAX_NORM_RATIO = 5.0
# Credits are kilotokens of inner training, computed from the spec (not from what the worker reports).
CREDIT_PER_TOKEN = Decimal("0.001")
_UPLOAD_HEADER_ALLOWANCE = 64 * 1024


# --- checkpoints and models ---------------------------------------------------------------------


def _checkpoint_blob(state: dict[str, torch.Tensor], meta: dict, *, before_write=None) -> tuple[str, int]:
    """Write weights content-addressed; returns (sha256, size). Safe to repeat, safe outside transactions.
    ``before_write(sha)`` runs once the name is known and before anything is written."""
    data = save_weights(state, meta)
    sha = sha256_hex(data)
    if before_write is not None:
        before_write(sha)
    blobs.blob_write(checkpoint_storage_name(sha), data, content_addressed=True, sha256=sha)  # verified on disk
    blobs.remember_state(sha, state, meta)
    return sha, len(data)


def _checkpoint_row(*, sha: str, size: int, model: CommunityModel, **fields) -> Checkpoint:
    checkpoint, _ = Checkpoint.objects.get_or_create(sha256=sha, defaults={"model": model, "size": size, **fields})
    return checkpoint


def _model_meta(arch: str, config: dict, **extra) -> dict:
    return {"arch": arch, "config": config, **extra}


def community_model_ensure(
    *, slug: str, name: str, arch: str, config: dict, seed: int = 0, description: str = ""
) -> CommunityModel:
    """The community model ``slug``, created with fresh weights (``init_state(seed)``) if it does not exist.

    Idempotent: an existing model is returned unchanged (and given initial weights if it has none).
    """
    existing = CommunityModel.objects.filter(slug=slug).first()
    if existing is not None and existing.current_checkpoint_id:
        return existing
    build_model(arch, config)  # raises ValueError for an unknown arch or config
    sha, size = _checkpoint_blob(init_state(arch, config, seed), _model_meta(arch, config, seed=seed))
    with transaction.atomic():
        model, created = CommunityModel.objects.select_for_update().get_or_create(
            slug=slug, defaults={"name": name, "arch": arch, "config": config, "description": description}
        )
        if model.current_checkpoint_id:
            return model
        checkpoint = _checkpoint_row(sha=sha, size=size, model=model, note=f"initial weights (seed {seed})")
        model.current_checkpoint = checkpoint
        model.save(update_fields=["current_checkpoint"])
        entry_append(actor=None, action="model.created", subject=f"model:{slug}",
                     payload={"slug": slug, "arch": arch, "config": config, "checkpoint": sha, "seed": seed})
    return model


# --- runs -----------------------------------------------------------------------------------------


def _task_seed(run_id: int, round_index: int, shard: int) -> int:
    digest = hashlib.sha256(f"agora:{run_id}:{round_index}:{shard}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def _round_open(*, run: TrainingRun, index: int, checkpoint_in: Checkpoint, now) -> Round:
    d = run.diloco
    timeout = timedelta(seconds=int(d["round_timeout_s"]))
    rnd = Round.objects.create(run=run, index=index, checkpoint_in=checkpoint_in, opened_at=now,
                               deadline=now + timeout, aggregator=d["aggregator"])
    k = int(d["workers_per_round"])
    Task.objects.bulk_create(
        Task(round=rnd, shard_index=s, seed=_task_seed(run.pk, index, s), deadline=now + timeout, created_at=now)
        for s in range(k)
    )
    run.current_round = index
    run.status = TrainingRun.Status.RUNNING
    run.save(update_fields=["current_round", "status"])
    entry_append(actor=None, action="round.opened", subject=run.ledger_subject,
                 payload={"run_id": run.pk, "round": index, "checkpoint": checkpoint_in.sha256, "tasks": k,
                          "deadline": rnd.deadline.isoformat()})
    return rnd


def run_start(*, proposal_id: int) -> TrainingRun | None:
    """Turn an approved training proposal into a run and open its first round; enact the proposal.

    Idempotent: returns the existing run for an already picked-up proposal, None for one that is not
    (or no longer) approved. The initial weights are written before the transaction (content-addressed,
    so a repeat or a lost race only rewrites the same bytes).
    """
    proposal = Proposal.objects.filter(pk=proposal_id, kind=Proposal.Kind.TRAINING).first()
    if proposal is None:
        return None
    existing = TrainingRun.objects.filter(proposal_id=proposal_id).first()
    if existing is not None or proposal.status != Proposal.Status.APPROVED:
        return existing
    spec = proposal.spec
    mspec = spec["model"]
    arch, config = mspec["arch"], mspec["config"]
    model = CommunityModel.objects.filter(slug=mspec["name"]).first()
    base_sha, base_size = None, 0
    if (mspec.get("init", "current") == "current" and model is not None and model.current_checkpoint_id
            and model.arch == arch and model.config == config):
        base_sha = model.current_checkpoint_id
    else:
        base_sha, base_size = _checkpoint_blob(init_state(arch, config, proposal.pk),
                                               _model_meta(arch, config, seed=proposal.pk))
    now = timezone.now()
    with transaction.atomic():
        proposal = Proposal.objects.select_for_update().get(pk=proposal_id)
        existing = TrainingRun.objects.filter(proposal_id=proposal_id).first()
        if existing is not None or proposal.status != Proposal.Status.APPROVED:
            return existing
        model, created = CommunityModel.objects.get_or_create(
            slug=mspec["name"],
            defaults={"name": mspec["name"], "arch": arch, "config": config,
                      "description": f"Created by proposal #{proposal.pk}: {proposal.title}"},
        )
        if created:
            entry_append(actor=None, action="model.created", subject=f"model:{model.slug}",
                         payload={"slug": model.slug, "arch": arch, "config": config, "proposal_id": proposal.pk})
        base = Checkpoint.objects.filter(sha256=base_sha).first() or _checkpoint_row(
            sha=base_sha, size=base_size, model=model, note=f"initial weights for proposal #{proposal.pk}")
        hardware = spec.get("hardware") or {}
        run = TrainingRun.objects.create(
            proposal=proposal, model=model, spec=spec, status=TrainingRun.Status.PENDING,
            total_rounds=int(spec["diloco"]["rounds"]), base_checkpoint=base,
            min_vram_mb=int(hardware.get("min_vram_mb") or 0), allow_cpu=bool(hardware.get("allow_cpu")),
            created_at=now,
        )
        entry_append(actor=None, action="run.created", subject=run.ledger_subject,
                     payload={"run_id": run.pk, "proposal_id": proposal.pk, "content_hash": proposal.content_hash,
                              "model": model.slug, "base_checkpoint": base.sha256,
                              "init": "current" if base.sha256 == model.current_checkpoint_id else "scratch",
                              "rounds": run.total_rounds})
        proposal_enact(proposal=proposal, outcome={"run_id": run.pk})
        _round_open(run=run, index=1, checkpoint_in=base, now=now)
    return run


def runs_start_approved() -> list[int]:
    """Pick up every approved training proposal (the beat's belt to the approval signal's braces)."""
    from governance.selectors import training_proposals_to_enact

    started = []
    for proposal_id in list(training_proposals_to_enact().values_list("pk", flat=True)):
        try:
            run = run_start(proposal_id=proposal_id)
        except Exception:  # one bad proposal must not stop the others
            log.exception("could not start a run for proposal %s", proposal_id)
            continue
        if run is not None:
            started.append(run.pk)
    return started


MAX_CANCEL_REASON = 2_000


@transaction.atomic
def run_cancel(*, run_id: int, by, reason: str) -> TrainingRun:
    """pending/running -> canceled (terminal), staff only, with a public reason.

    The open round is closed (``canceled``, with a ``round.canceled`` entry) and its open tasks expire at
    once, so agents stop getting work from the run, heartbeats tell them to stop, and their uploads are
    refused (410); an aggregation already under way commits nothing (see ``_aggregate_commit``). Rows are
    locked round first, then run: the order ``_aggregate_commit`` uses.
    """
    if by is None or not getattr(by, "is_authenticated", False) or not by.is_staff:
        raise RunForbidden("only staff can cancel a training run")
    reason = (reason or "").strip()
    if not reason:
        raise serializers.ValidationError({"reason": ["Canceling a run needs a reason; it is published in the ledger."]})
    if len(reason) > MAX_CANCEL_REASON:
        raise serializers.ValidationError({"reason": [f"At most {MAX_CANCEL_REASON} characters."]})
    open_rounds = list(Round.objects.select_for_update().filter(
        run_id=run_id, status__in=[Round.Status.OPEN, Round.Status.AGGREGATING]).order_by("index"))
    run = TrainingRun.objects.select_for_update().filter(pk=run_id).first()
    if run is None:
        raise TrainingError(f"there is no run {run_id}", code="not_found", http_status=404)
    if not run.is_active:
        raise RunError(f"only a pending or running run can be canceled, not a {run.status} one")
    run.status, run.reason, run.finished_at = TrainingRun.Status.CANCELED, reason, timezone.now()
    run.save(update_fields=["status", "reason", "finished_at"])
    entry_append(actor=by, action="run.canceled", subject=run.ledger_subject, payload={"reason": reason})
    for rnd in open_rounds:
        was = rnd.status
        rnd.status, rnd.reason = Round.Status.CANCELED, f"run canceled: {reason}"
        rnd.aggregation_token, rnd.lease_expires_at = "", None
        rnd.save(update_fields=["status", "reason", "aggregation_token", "lease_expires_at"])
        closed = _round_close_tasks(rnd, reason="run canceled")
        entry_append(actor=by, action="round.canceled", subject=run.ledger_subject,
                     payload={"run_id": run.pk, "round": rnd.index, "was": was, "expired_tasks": closed})
    _run_expire_stray_tasks(run)
    return run


def _run_expire_stray_tasks(run: TrainingRun) -> None:
    """Open tasks left in rounds that are not open (none should be): expire them too."""
    stray = Task.objects.filter(round__run=run, status__in=[Task.Status.PENDING, Task.Status.ASSIGNED])
    rows = list(stray.values_list("pk", "worker_id"))
    if rows:
        Task.objects.filter(pk__in=[pk for pk, _ in rows]).update(status=Task.Status.EXPIRED, reason="run canceled")
        _tell_stopped({pk: (w, "run canceled") for pk, w in rows if w is not None})


# --- tasks: claim, result, fail ------------------------------------------------------------------


def max_upload_bytes(run: TrainingRun) -> int:
    m = run.spec["model"]
    reference = blobs.model_reference(m["arch"], m["config"])
    return payload_nbytes(reference, run.diloco["compression"]) + 256 * len(reference) + _UPLOAD_HEADER_ALLOWANCE


# A worker holding a task in one of these states has its say in the round; failed and expired ones do not.
LIVE_TASK_STATUSES = (Task.Status.ASSIGNED, Task.Status.COMPLETED, Task.Status.ACCEPTED, Task.Status.REJECTED)
_LOST_TASK_STATUSES = (Task.Status.FAILED, Task.Status.EXPIRED)


@transaction.atomic
def task_claim(*, worker) -> Task | None:
    """Assign the oldest pending task this worker may take, or None.

    Eligible: the run is running and its hardware requirements admit the worker (GPU memory at least
    ``min_vram_mb``; a CPU-only worker only where ``allow_cpu``), and the worker holds no live task
    (assigned, or with a result) in that round. Rows are locked with ``SKIP LOCKED`` on PostgreSQL so
    concurrent claims never collide; SQLite serialises writers anyway. A partial unique constraint on
    (round, worker) over live tasks backs the last rule.

    A worker whose task in a round failed or expired may take another task of that round: otherwise a
    round whose every available worker once lost a task (a web outage during uploads, a restarted agent
    reporting its old task failed) could never be finished. Its own late tasks are expired first, so
    an agent that restarts after its deadline gets work at once. Among the tasks it may take, one of a
    shard it has not already lost in that round comes first: a failure tied to a shard on that machine
    (memory, a pathological document) is not repeated while another shard is waiting, and with exactly
    k workers it still gets its own shard back. The replacement is a new task with its own credit, so
    credits stay at most one grant per task.
    """
    from marketplace.models import Worker

    worker = Worker.objects.only("id", "gpus", "status").get(pk=worker.pk)
    if worker.status != Worker.Status.ACTIVE:
        return None
    now = timezone.now()
    late_rounds = set(Task.objects.filter(worker_id=worker.pk, status=Task.Status.ASSIGNED, deadline__lte=now)
                      .values_list("round_id", flat=True))
    for round_id in sorted(late_rounds):
        round_expire_late_tasks(round_id=round_id, now=now)
    vram = worker.max_vram_mb
    hardware = Q(round__run__allow_cpu=True) if vram <= 0 else Q(round__run__min_vram_mb__lte=vram)
    holds = Task.objects.filter(round_id=OuterRef("round_id"), worker_id=worker.pk, status__in=LIVE_TASK_STATUSES)
    lost_shard = Task.objects.filter(round_id=OuterRef("round_id"), shard_index=OuterRef("shard_index"),
                                     worker_id=worker.pk, status__in=_LOST_TASK_STATUSES)
    task = (
        Task.objects.filter(status=Task.Status.PENDING, round__status=Round.Status.OPEN,
                            round__run__status=TrainingRun.Status.RUNNING)
        .filter(hardware)
        .filter(~Exists(holds))
        .annotate(lost_before=Exists(lost_shard))
        .order_by("lost_before", "created_at", "id")
        .select_for_update(skip_locked=True, of=("self",))
        .first()
    )
    if task is None:
        return None
    rnd = Round.objects.select_related("run").get(pk=task.round_id)
    task.worker_id = worker.pk
    task.status = Task.Status.ASSIGNED
    task.claimed_at = now
    task.deadline = now + timedelta(seconds=int(rnd.run.diloco["round_timeout_s"]))
    try:
        with transaction.atomic():
            task.save(update_fields=["worker", "status", "claimed_at", "deadline"])
    except IntegrityError:  # the same worker claimed in this round concurrently
        return None
    entry_append(actor=worker, action="task.claimed", subject=rnd.run.ledger_subject,
                 payload={"task_id": task.pk, "run_id": rnd.run_id, "round": rnd.index, "shard": task.shard_index,
                          "worker_id": worker.pk})
    task_id, deadline = task.pk, task.deadline.timestamp()
    transaction.on_commit(lambda: tasks_liveness.mark_live(task_id=task_id, worker_id=worker.pk, deadline=deadline))
    task.round = rnd
    return task


def _tell_stopped(stops: dict[int, tuple[int | None, str]]) -> None:
    """After commit, tell heartbeats that these tasks (``{task_id: (worker_id, reason)}``) are not wanted."""
    if stops:
        stops = dict(stops)
        transaction.on_commit(lambda: tasks_liveness.mark_stopped(stops))


def task_stop_reason(task_id: int, worker_id: int) -> str | None:
    """Why ``task_id`` is no longer wanted from ``worker_id`` (None while it is): the database answer
    behind the heartbeat's cache marker (``marketplace.tasks_liveness``), which it writes back."""
    not_yours = "this task is not assigned to this worker"
    if not 0 < task_id < 2**63:
        return not_yours
    task = (Task.objects.select_related("round", "round__run").only(
        "id", "status", "worker_id", "deadline", "reason", "round__index", "round__status", "round__run__status",
        "round__run__reason").filter(pk=task_id).first())
    if task is None or task.worker_id is None:
        # Remembered too, so an agent naming a bogus id costs one query, not one per heartbeat; a claim
        # overwrites the marker when the task is handed out.
        tasks_liveness.remember(task_id=task_id, worker_id=None, deadline=None, stop=not_yours)
        return not_yours
    rnd, run = task.round, task.round.run
    reason, lasting = None, True
    if run.status != TrainingRun.Status.RUNNING:
        reason = f"the run is {run.status}" + (f": {run.reason}" if run.reason else "")
    elif task.status == Task.Status.FAILED:
        reason = "the task was reported failed"
    elif task.status == Task.Status.EXPIRED:
        reason = f"the task expired: {task.reason or 'deadline passed'}"
    elif task.status in (Task.Status.ACCEPTED, Task.Status.REJECTED) or rnd.status in (
            Round.Status.DONE, Round.Status.REJECTED):
        reason = f"round {rnd.index} was already aggregated"
    elif rnd.status == Round.Status.AGGREGATING:
        # Not remembered: an aggregation that fails re-opens the round, and the task is wanted again.
        lasting = False
        if task.status == Task.Status.ASSIGNED:
            reason = f"round {rnd.index} is being aggregated without it"
    elif rnd.status != Round.Status.OPEN:
        reason = f"round {rnd.index} is {rnd.status}"
    elif task.status == Task.Status.ASSIGNED and task.deadline <= timezone.now():
        reason = "the task's deadline passed"
    if lasting:
        deadline = None if task.status == Task.Status.COMPLETED else task.deadline.timestamp()
        tasks_liveness.remember(task_id=task.pk, worker_id=task.worker_id, deadline=deadline, stop=reason)
    if task.worker_id != worker_id:
        return not_yours
    return reason


def _task_check_open(task: Task, worker, now) -> None:
    """Raise the protocol error for a task this worker may not report on now."""
    if task.worker_id != worker.pk:
        raise NotYourTask(f"task {task.pk} is not assigned to this worker")
    if task.status in (Task.Status.COMPLETED, Task.Status.ACCEPTED, Task.Status.REJECTED):
        raise TaskCompleted(f"task {task.pk} already has a result")
    if task.status == Task.Status.EXPIRED:
        raise TaskExpired(f"task {task.pk} expired ({task.reason or 'deadline passed'}); it was given to another worker")
    if task.status != Task.Status.ASSIGNED:
        raise TaskNotOpen(f"task {task.pk} is {task.status}")
    if task.deadline <= now:
        raise TaskExpired(f"task {task.pk} passed its deadline {task.deadline.isoformat()}")
    if task.round.status != Round.Status.OPEN:
        raise TaskExpired(f"round {task.round.index} of run {task.round.run_id} has closed")


def task_for_worker(*, task_id: int, worker) -> Task:
    """The task, if this worker may report on it now; otherwise the protocol error (403/404/409/410)."""
    task = Task.objects.select_related("round", "round__run").filter(pk=task_id).first()
    if task is None:
        raise TrainingError(f"there is no task {task_id}", code="not_found", http_status=404)
    _task_check_open(task, worker, timezone.now())
    return task


def _classify_codec_error(message: str) -> str:
    if "not a safetensors" in message:
        return "not_safetensors"
    if "non-finite" in message:
        return "non_finite"
    if any(w in message for w in ("shape", "dtype", "missing tensor", "unexpected tensor", "scale of")):
        return "tensor_mismatch"
    return "invalid_update"


def update_validate(*, run: TrainingRun, data: bytes) -> dict[str, torch.Tensor]:
    """Decode an uploaded pseudo-gradient against the run's model; raise ``InvalidUpdate`` naming the problem.

    Any codec the decoder knows is accepted; the size limit follows the run's compression, so a fatter
    encoding than the run asked for is refused as too large rather than as a different format.
    """
    limit = max_upload_bytes(run)
    if len(data) > limit:
        raise UploadTooLarge(f"update is {len(data)} bytes; this task accepts at most {limit}")
    m = run.spec["model"]
    try:
        return decode_update(data, blobs.model_reference(m["arch"], m["config"]))
    except CodecError as exc:
        raise InvalidUpdate(str(exc), code=_classify_codec_error(str(exc))) from None


def task_submit_result(*, task_id: int, worker, data: bytes, metrics: dict) -> Task:
    """Store a validated pseudo-gradient for an assigned task and mark it completed.

    Everything is checked before anything is written; the blob is written inside the transaction that
    marks the task completed and deleted again if that transaction does not commit. ``metrics`` is
    already validated by the API serializer.
    """
    task = task_for_worker(task_id=task_id, worker=worker)
    run = task.round.run
    update_validate(run=run, data=data)
    sha = sha256_hex(data)
    name = f"updates/run-{run.pk}/round-{task.round.index}/task-{task.pk}-{sha[:16]}.safetensors"
    written = False
    try:
        with transaction.atomic():
            rnd = Round.objects.select_for_update().get(pk=task.round_id)
            task = Task.objects.select_for_update().get(pk=task_id)
            task.round = rnd
            now = timezone.now()
            _task_check_open(task, worker, now)
            blobs.blob_write(name, data, sha256=sha)  # checked on disk before the row names it
            written = True
            task.status = Task.Status.COMPLETED
            task.completed_at = now
            task.update_name, task.update_sha256, task.update_size = name, sha, len(data)
            task.metrics = metrics
            task.save(update_fields=["status", "completed_at", "update_name", "update_sha256", "update_size",
                                     "metrics"])
            entry_append(actor=worker, action="task.completed", subject=run.ledger_subject,
                         payload={"task_id": task.pk, "run_id": run.pk, "round": rnd.index, "shard": task.shard_index,
                                  "update_sha256": sha, "size": len(data), "metrics": metrics})
            round_id = rnd.pk
            transaction.on_commit(lambda: _enqueue_round_check(round_id))
            transaction.on_commit(lambda: tasks_liveness.mark_live(task_id=task_id, worker_id=worker.pk,
                                                                   deadline=None))
    except BaseException:
        if written:
            blobs.blob_delete(name)
        raise
    return task


@transaction.atomic
def task_fail(*, task_id: int, worker, reason: str) -> Task:
    """The worker gives the task up; a replacement for the same shard is issued at once (any worker without
    a live task in the round may take it, this one included: see ``task_claim``)."""
    task = Task.objects.select_related("round", "round__run").filter(pk=task_id).first()
    if task is None:
        raise TrainingError(f"there is no task {task_id}", code="not_found", http_status=404)
    rnd = Round.objects.select_for_update().get(pk=task.round_id)
    task = Task.objects.select_for_update().get(pk=task_id)
    task.round = rnd
    if task.worker_id != worker.pk:
        raise NotYourTask(f"task {task.pk} is not assigned to this worker")
    if task.status == Task.Status.FAILED:
        return task
    _task_check_open(task, worker, timezone.now())
    task.status, task.reason = Task.Status.FAILED, (reason or "no reason given")[:1000]
    task.save(update_fields=["status", "reason"])
    _tell_stopped({task.pk: (task.worker_id, "the task was reported failed")})
    replacement = _task_replace(task, rnd)
    entry_append(actor=worker, action="task.failed", subject=f"run:{rnd.run_id}",
                 payload={"task_id": task.pk, "run_id": rnd.run_id, "round": rnd.index, "shard": task.shard_index,
                          "reason": task.reason, "replacement_task_id": replacement.pk})
    return task


def _task_replace(task: Task, rnd: Round) -> Task:
    now = timezone.now()
    run = rnd.run
    return Task.objects.create(
        round=rnd, shard_index=task.shard_index, seed=task.seed, replaces=task, created_at=now,
        deadline=now + timedelta(seconds=int(run.diloco["round_timeout_s"])),
    )


# --- rounds: deadlines and readiness --------------------------------------------------------------


def _enqueue_round_check(round_id: int) -> None:
    """Runs after commit: a broker hiccup must not turn a stored result into an error (the tick catches up)."""
    from training.tasks import enqueue, round_check

    enqueue(round_check, round_id)


@transaction.atomic
def round_expire_late_tasks(*, round_id: int, now=None) -> list[int]:
    """Mark assigned tasks past their deadline expired and issue each shard again (see ``task_claim`` for
    who may take it)."""
    now = now or timezone.now()
    rnd = Round.objects.select_for_update().select_related("run").get(pk=round_id)
    if rnd.status != Round.Status.OPEN:
        return []
    expired = []
    stops = {}
    for task in Task.objects.select_for_update().filter(round=rnd, status=Task.Status.ASSIGNED, deadline__lte=now):
        task.status, task.reason = Task.Status.EXPIRED, "deadline passed without a result"
        task.save(update_fields=["status", "reason"])
        stops[task.pk] = (task.worker_id, f"the task expired: {task.reason}")
        replacement = _task_replace(task, rnd)
        entry_append(actor=None, action="task.expired", subject=rnd.run.ledger_subject,
                     payload={"task_id": task.pk, "run_id": rnd.run_id, "round": rnd.index, "shard": task.shard_index,
                              "worker_id": task.worker_id, "replacement_task_id": replacement.pk})
        expired.append(task.pk)
    _tell_stopped(stops)
    return expired


def _round_ready(rnd: Round, now) -> bool:
    d = rnd.run.diloco
    done = Task.objects.filter(round=rnd, status=Task.Status.COMPLETED).count()
    if done >= int(d["workers_per_round"]):
        return True
    return now >= rnd.deadline and done >= int(d["min_workers"])


@transaction.atomic
def round_extend_if_starved(*, round_id: int, now=None) -> bool:
    """Past the deadline with fewer than ``min_workers`` results: give the round another timeout, at most
    ``diloco.max_round_extensions`` times per attempt; after that the attempt fails (``_round_fail``).
    Returns whether the round changed."""
    now = now or timezone.now()
    rnd = Round.objects.select_for_update().select_related("run").get(pk=round_id)
    if rnd.status != Round.Status.OPEN or rnd.run.status != TrainingRun.Status.RUNNING or now < rnd.deadline \
            or _round_ready(rnd, now):
        return False
    d = rnd.run.diloco
    done = Task.objects.filter(round=rnd, status=Task.Status.COMPLETED).count()
    if rnd.extensions >= int(d.get("max_round_extensions", DEFAULT_MAX_ROUND_EXTENSIONS)):
        _round_fail(rnd=rnd, results=done, now=now)
        return True
    rnd.deadline = now + timedelta(seconds=int(d["round_timeout_s"]))
    rnd.extensions += 1
    rnd.save(update_fields=["deadline", "extensions"])
    entry_append(actor=None, action="round.extended", subject=rnd.run.ledger_subject,
                 payload={"run_id": rnd.run_id, "round": rnd.index, "attempt": rnd.attempt, "results": done,
                          "min_workers": int(d["min_workers"]), "extension": rnd.extensions,
                          "deadline": rnd.deadline.isoformat()})
    return True


def _round_fail(*, rnd: Round, results: int, now) -> None:
    """This attempt of the round got too few results: record why; try the round again, or fail the run
    once it has had more than ``diloco.max_failed_rounds`` failed attempts.

    A new attempt keeps the round's row, its checkpoint and the results already in (they were trained
    from the same weights); every shard still has its pending or assigned task, the deadline and the
    extension count start afresh. The caller holds the round's row lock; the run's is taken after it.
    """
    run = TrainingRun.objects.select_for_update().get(pk=rnd.run_id)
    d = run.diloco
    needed, timeout = int(d["min_workers"]), int(d["round_timeout_s"])
    allowed = int(d.get("max_failed_rounds", DEFAULT_MAX_FAILED_ROUNDS))
    reason = (f"attempt {rnd.attempt} of round {rnd.index} got {results} of the {needed} result(s) it needs "
              f"within {rnd.extensions} extension(s) of its {timeout} s deadline")
    run.failed_rounds += 1
    retry = run.failed_rounds <= allowed
    payload = {"run_id": run.pk, "round": rnd.index, "attempt": rnd.attempt, "reason": reason, "results": results,
               "min_workers": needed, "extensions": rnd.extensions, "failed_rounds": run.failed_rounds,
               "max_failed_rounds": allowed, "retry": retry}
    if retry:
        rnd.attempt += 1
        rnd.extensions = 0
        rnd.deadline = now + timedelta(seconds=timeout)
        rnd.reason = f"{reason}; attempt {rnd.attempt} opened"
        rnd.save(update_fields=["attempt", "extensions", "deadline", "reason"])
        run.save(update_fields=["failed_rounds"])
        entry_append(actor=None, action="round.failed", subject=run.ledger_subject,
                     payload={**payload, "deadline": rnd.deadline.isoformat()})
        return
    rnd.status, rnd.reason = Round.Status.FAILED, reason
    rnd.save(update_fields=["status", "reason"])
    _round_close_tasks(rnd, reason=f"round {rnd.index} failed")
    run.status, run.finished_at = TrainingRun.Status.FAILED, now
    run.reason = (f"round {rnd.index} failed and the run allows {allowed} failed round attempt(s); "
                  f"this was failure {run.failed_rounds}: {reason}")
    run.save(update_fields=["failed_rounds", "status", "reason", "finished_at"])
    entry_append(actor=None, action="round.failed", subject=run.ledger_subject, payload=payload)
    entry_append(actor=None, action="run.failed", subject=run.ledger_subject,
                 payload={"run_id": run.pk, "round": rnd.index, "reason": run.reason,
                          "failed_rounds": run.failed_rounds, "max_failed_rounds": allowed})


def _round_close_tasks(rnd: Round, *, reason: str) -> list[int]:
    """Expire the round's pending and assigned tasks (they will never be aggregated) and tell their agents."""
    # Locked, so a claim committing meanwhile is waited for and its worker gets the stop marker too.
    open_tasks = list(Task.objects.select_for_update().filter(
        round=rnd, status__in=[Task.Status.PENDING, Task.Status.ASSIGNED]).values_list("pk", "worker_id"))
    Task.objects.filter(pk__in=[pk for pk, _ in open_tasks]).update(status=Task.Status.EXPIRED, reason=reason)
    _tell_stopped({pk: (worker_id, reason) for pk, worker_id in open_tasks if worker_id is not None})
    return [pk for pk, _ in open_tasks]


# --- aggregation ---------------------------------------------------------------------------------


@dataclass
class _Verdict:
    task: Task
    accepted: bool
    reason: str
    norm: float | None = None
    cosine: float | None = None


@dataclass
class _Outcome:
    verdicts: list[_Verdict]
    accepted: bool
    reason: str
    eval_before: float | None
    eval_after: float | None
    new_state: dict | None = None
    checkpoint_sha: str | None = None
    checkpoint_size: int = 0
    outer_state_name: str = ""
    outer_state_sha: str = ""
    timings: dict = field(default_factory=dict)


def aggregation_lease_s() -> int:
    return max(3, int(getattr(settings, "AGORA_AGGREGATION_LEASE_S", 30)))


def _lease_lapsed(rnd: Round, now) -> bool:
    if rnd.status != Round.Status.AGGREGATING:
        return False
    if rnd.lease_expires_at is not None:
        return rnd.lease_expires_at <= now
    started = rnd.aggregation_started_at
    return started is None or started <= now - timedelta(seconds=AGGREGATION_STALE_S)


def _attempt_manifest_name(run_id: int, index: int, token: str) -> str:
    return f"outer/run-{run_id}/round-{index}-{token}.files.json"


def _attempt_outer_name(run_id: int, index: int, token: str) -> str:
    return f"outer/run-{run_id}/round-{index}-{token}.safetensors"


def _attempt_files_delete(run_id: int, index: int, token: str, *, checkpoint: bool) -> None:
    """Delete what an aggregation attempt wrote and never committed: its outer state and manifest, and,
    when ``checkpoint``, the step checkpoint its manifest names unless a committed row holds those bytes.

    Only whoever holds the round (its lease, or its row lock with the lease lapsed) may delete the
    checkpoint: it is content addressed, so another live attempt could be writing the same name."""
    manifest = _attempt_manifest_name(run_id, index, token)
    sha = None
    if checkpoint:
        try:
            sha = json.loads(blobs.blob_read(manifest)).get("checkpoint")
        except Exception:  # never written, or cut short: then no checkpoint was written after it either
            sha = None
    if isinstance(sha, str) and len(sha) == 64 and not Checkpoint.objects.filter(sha256=sha).exists():
        blobs.blob_delete(checkpoint_storage_name(sha))
    blobs.blob_delete(_attempt_outer_name(run_id, index, token))
    blobs.blob_delete(manifest)


def _round_reopen(rnd: Round, *, reason: str, now) -> None:
    """``aggregating -> open`` for an attempt that died or gave up, its files deleted. The caller holds the
    round's row lock, so no new attempt can start writing before the old one's files are gone."""
    old = rnd.aggregation_token
    if old:
        _attempt_files_delete(rnd.run_id, rnd.index, old, checkpoint=True)
    rnd.status, rnd.aggregation_token, rnd.aggregation_started_at, rnd.lease_expires_at = \
        Round.Status.OPEN, "", None, None
    rnd.save(update_fields=["status", "aggregation_token", "aggregation_started_at", "lease_expires_at"])
    entry_append(actor=None, action="round.aggregation_restarted", subject=f"run:{rnd.run_id}",
                 payload={"run_id": rnd.run_id, "round": rnd.index, "reason": reason, "at": now.isoformat()})


@transaction.atomic
def round_take_over_if_lapsed(*, round_id: int, now=None) -> bool:
    """Re-open a round whose aggregation's lease lapsed (its worker was killed), deleting the dead
    attempt's files; the caller then aggregates it again. Returns whether it did."""
    now = now or timezone.now()
    rnd = Round.objects.select_for_update().filter(pk=round_id).first()
    if rnd is None or not _lease_lapsed(rnd, now):
        return False
    _round_reopen(rnd, now=now, reason=_lapsed_reason(rnd))
    return True


def _lapsed_reason(rnd: Round) -> str:
    lapsed = rnd.lease_expires_at or rnd.aggregation_started_at
    return f"the aggregation's lease lapsed at {lapsed.isoformat()}" if lapsed else "the aggregation's lease lapsed"


@transaction.atomic
def _round_claim_for_aggregation(*, round_id: int, now) -> tuple[Round, str, list[Task]] | None:
    rnd = Round.objects.select_for_update().select_related("run").filter(pk=round_id).first()
    if rnd is not None and _lease_lapsed(rnd, now):  # a dead attempt's round: take it over here
        _round_reopen(rnd, now=now, reason=_lapsed_reason(rnd))
    if rnd is None or rnd.status != Round.Status.OPEN or rnd.run.status != TrainingRun.Status.RUNNING \
            or not _round_ready(rnd, now):
        return None
    token = uuid.uuid4().hex
    rnd.status, rnd.aggregation_token, rnd.aggregation_started_at = Round.Status.AGGREGATING, token, now
    rnd.lease_expires_at = now + timedelta(seconds=aggregation_lease_s())
    rnd.save(update_fields=["status", "aggregation_token", "aggregation_started_at", "lease_expires_at"])
    tasks = list(Task.objects.filter(round=rnd, status=Task.Status.COMPLETED).select_related("worker")
                 .order_by("shard_index", "id"))
    return rnd, token, tasks


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _previous_eval(rnd: Round) -> float | None:
    if rnd.index == 1:
        return None
    prev = Round.objects.filter(run_id=rnd.run_id, index=rnd.index - 1).first()
    if prev is None or prev.checkpoint_out_id != rnd.checkpoint_in_id:
        return None
    return prev.eval_loss_after if prev.accepted else prev.eval_loss_before


def eval_device() -> str:
    """Where held-out evaluation runs: ``AGORA_TRAINING_DEVICE`` (``cpu``, ``cuda``, or ``auto``)."""
    wanted = getattr(settings, "AGORA_TRAINING_DEVICE", "cpu") or "cpu"
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted


def _previous_median_norm(rnd: Round) -> float | None:
    norms = list(Task.objects.filter(round__run_id=rnd.run_id, round__index__lt=rnd.index, status=Task.Status.ACCEPTED,
                                     update_norm__isnull=False)
                 .order_by("-round__index").values_list("round__index", "update_norm")[:256])
    if not norms:
        return None
    latest = norms[0][0]
    return statistics.median(n for index, n in norms if index == latest)


def eval_precision() -> torch.dtype | None:
    """The autocast dtype of held-out evaluation (``AGORA_EVAL_PRECISION``); None is fp32."""
    return eval_dtype(getattr(settings, "AGORA_EVAL_PRECISION", "auto") or "auto", eval_device())


def _eval(state: dict, run: TrainingRun, tokens) -> float:
    m = run.spec["model"]
    device = eval_device()
    model = model_with_weights(m["arch"], m["config"], state).to(device)
    d = run.diloco
    return evaluate_loss(model, tokens, batch_size=int(d["batch_size"]), seq_len=int(d["seq_len"]),
                         batches=EVAL_BATCHES, seed=0, device=device, autocast_dtype=eval_precision())


class _LeaseLost(Exception):
    """This aggregation attempt no longer holds its round: its lease lapsed and another attempt took over,
    or the run was canceled."""


def _lease_renew(round_id: int, token: str) -> bool:
    """Extend the lease if this attempt still holds the round (one UPDATE, its own transaction)."""
    until = timezone.now() + timedelta(seconds=aggregation_lease_s())
    return Round.objects.filter(pk=round_id, status=Round.Status.AGGREGATING, aggregation_token=token).update(
        lease_expires_at=until) == 1


@dataclass
class _Lease:
    """An aggregation attempt's hold on its round: renewed at every phase boundary (where losing it stops
    the attempt) and by a keep-alive thread while a phase runs (see ``kept``)."""

    round_id: int
    token: str

    def renew(self) -> None:
        if not _lease_renew(self.round_id, self.token):
            raise _LeaseLost(f"the aggregation of round id {self.round_id} was taken over")

    @contextlib.contextmanager
    def kept(self):
        """Renew the lease every third of its length from a daemon thread while the block runs. The thread
        has its own database connection and closes it; its failures are only logged (the phase
        boundaries decide whether the attempt goes on)."""
        stop = threading.Event()
        every = aggregation_lease_s() / 3

        def keep_alive():
            try:
                while not stop.wait(every):
                    try:
                        if not _lease_renew(self.round_id, self.token):
                            log.warning("aggregation of round id %s lost its lease", self.round_id)
                            return
                    except Exception:
                        log.warning("could not renew the aggregation lease of round id %s", self.round_id,
                                    exc_info=True)
            finally:
                connections.close_all()

        thread = threading.Thread(target=keep_alive, name=f"agora-lease-{self.round_id}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(timeout=5)


def _aggregate_compute(rnd: Round, token: str, tasks: list[Task], *, lease: _Lease | None = None) -> _Outcome:
    """The tensor work of one round. Blobs written here are content addressed (checkpoint) or unique to
    this attempt (outer state); before writing them the attempt lists them in its manifest, so whoever
    takes over a dead attempt can delete them. With a ``lease`` it is renewed at each phase boundary,
    raising ``_LeaseLost`` once another attempt holds the round."""
    run = rnd.run
    d = run.diloco
    renew = lease.renew if lease is not None else (lambda: None)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    state_in, _meta_in = blobs.checkpoint_state(rnd.checkpoint_in_id)
    m = run.spec["model"]
    reference = blobs.model_reference(m["arch"], m["config"])
    verdicts: list[_Verdict] = []
    updates, owners = [], []
    for task in tasks:
        try:
            updates.append(decode_update(blobs.blob_read(task.update_name), reference))
            owners.append(task)
        except (CodecError, OSError) as exc:  # validated at upload; only storage trouble lands here
            verdicts.append(_Verdict(task, False, f"update unreadable: {exc}"))
    timings["decode_s"] = time.perf_counter() - t0
    renew()
    t = time.perf_counter()
    # With two or three updates an attacker drags the round's median norm; the last round's accepted
    # norms are out of its reach, so updates far from those are turned away before the round's screening.
    history = _previous_median_norm(rnd)
    if history and updates:
        kept_updates, kept_owners = [], []
        for task, update, norm in zip(owners, updates, update_norms(updates), strict=True):
            ratio = norm / history
            if not math.isfinite(norm) or ratio > MAX_NORM_RATIO or ratio < 1 / MAX_NORM_RATIO:
                verdicts.append(_Verdict(task, False, f"norm {norm:.4g} is {ratio:.3g}x the previous round's median "
                                         f"accepted norm {history:.4g} (limits 1/{MAX_NORM_RATIO:g}x to "
                                         f"{MAX_NORM_RATIO:g}x)", norm))
            else:
                kept_updates.append(update)
                kept_owners.append(task)
        updates, owners = kept_updates, kept_owners
    screens = screen_updates(updates, max_norm_ratio=MAX_NORM_RATIO) if updates else []
    good = []
    for task, update, screen in zip(owners, updates, screens, strict=True):
        verdicts.append(_Verdict(task, screen.accepted, screen.reason, screen.norm, screen.cosine))
        if screen.accepted:
            good.append(update)
    timings["screen_s"] = time.perf_counter() - t
    renew()
    tokens = blobs.heldout_tokens(run.spec["dataset"])
    t = time.perf_counter()
    eval_before = _previous_eval(rnd)
    if eval_before is None:
        eval_before = _eval(state_in, run, tokens)
    timings["eval_before_s"] = time.perf_counter() - t
    if not good:
        return _Outcome(verdicts, False, "no update passed screening", eval_before, None, timings=timings)
    t = time.perf_counter()
    pseudo_gradient = aggregate(good, d["aggregator"])
    timings["aggregate_s"] = time.perf_counter() - t
    t = time.perf_counter()
    outer_state = blobs.outer_state(run.outer_state_name) if run.outer_state_name else None
    lr, momentum = float(d["outer_lr"]), float(d["outer_momentum"])
    if outer_state:
        opt = OuterOptimizer.from_state(state_in, outer_state, lr=lr, momentum=momentum, nesterov=True)
    else:
        opt = OuterOptimizer(state_in, lr=lr, momentum=momentum, nesterov=True)
    new_state = opt.step(pseudo_gradient)
    timings["outer_step_s"] = time.perf_counter() - t
    renew()
    t = time.perf_counter()
    outer_name = _attempt_outer_name(run.pk, rnd.index, token)
    meta = _model_meta(m["arch"], m["config"], run_id=run.pk, round=rnd.index)
    save = functools.partial(_save_step, new_state, meta, opt.state_tensors(copy=False), outer_name,
                             manifest_name=_attempt_manifest_name(run.pk, rnd.index, token))
    saved = None
    if _overlap_eval_with_writes():
        # The new weights and optimizer state are serialised, hashed and written while the held-out loss
        # is evaluated; a step the evaluation turns down has its blobs removed again.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="agora-save") as pool:
            saving = pool.submit(save)
            t_eval = time.perf_counter()
            try:
                with _one_core_spared():
                    eval_after = _eval(new_state, run, tokens)
            finally:
                timings["eval_after_s"] = time.perf_counter() - t_eval
                saved = saving.result()
    else:
        eval_after = _eval(new_state, run, tokens)
        timings["eval_after_s"] = time.perf_counter() - t
    renew()
    rejection = ""
    if not _finite(eval_after):
        rejection = "held-out loss after the step is not finite"
    elif eval_after > eval_before * (1 + EVAL_TOLERANCE):
        rejection = (f"held-out loss rose from {eval_before:.4f} to {eval_after:.4f} "
                     f"(more than {EVAL_TOLERANCE:.0%}); step rejected")
    if rejection:
        if saved:
            _discard_step(saved[0], outer_name)
        timings["eval_and_save_s"] = time.perf_counter() - t
        return _Outcome(verdicts, False, rejection, eval_before, eval_after if _finite(eval_after) else None,
                        timings=timings)
    sha, size, outer_sha, save_timings = saved or save()
    timings.update(save_timings)
    timings["eval_and_save_s"] = time.perf_counter() - t
    return _Outcome(verdicts, True, "", eval_before, eval_after, new_state=new_state, checkpoint_sha=sha,
                    checkpoint_size=size, outer_state_name=outer_name, outer_state_sha=outer_sha,
                    timings=timings)


def _overlap_eval_with_writes() -> bool:
    """Whether to write the step's blobs while evaluating it. Overlapping costs the evaluation a core
    (see ``_one_core_spared``): worth it on a GPU, with bf16 on a CPU (the evaluation is then short), or
    with four or more cores; with fp32 on two or three cores, evaluating first and writing after is faster."""
    if torch.device(eval_device()).type != "cpu":
        return True
    return eval_precision() is not None or torch.get_num_threads() >= 4


@contextlib.contextmanager
def _one_core_spared():
    """While a CPU evaluation overlaps the blob writes, give torch one thread fewer than it has: with
    every core busy computing, the writer thread's turns make torch's threads wait on each other, and
    the overlap ends up slower than doing the two one after the other."""
    before = torch.get_num_threads()
    if before > 1 and torch.device(eval_device()).type == "cpu":
        torch.set_num_threads(before - 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _save_step(new_state: dict, meta: dict, outer_tensors: dict, outer_name: str, *,
               manifest_name: str = "") -> tuple[str, int, str, dict]:
    """Write a step's checkpoint (content addressed) and outer optimizer state; returns
    (checkpoint sha256, checkpoint size, outer state sha256, timings). With ``manifest_name``, the names
    about to be written are put there first (storage only, no database: this may run in a thread)."""

    def list_files(sha: str) -> None:
        if manifest_name:
            blobs.blob_write(manifest_name, json.dumps({"checkpoint": sha, "outer_state": outer_name}).encode())

    t = time.perf_counter()
    sha, size = _checkpoint_blob(new_state, meta, before_write=list_files)
    t_outer = time.perf_counter()
    outer_bytes = save_weights(outer_tensors, {"run_id": meta.get("run_id"), "round": meta.get("round")})
    outer_sha = sha256_hex(outer_bytes)
    blobs.blob_write(outer_name, outer_bytes, sha256=outer_sha)  # checked on disk before the run row names it
    blobs.remember_outer_state(outer_name, outer_tensors)
    done = time.perf_counter()
    return sha, size, outer_sha, {"save_checkpoint_s": t_outer - t, "save_outer_state_s": done - t_outer}


def _discard_step(sha: str, outer_name: str) -> None:
    """Remove the blobs of a step that was turned down. The checkpoint blob stays if some checkpoint row
    already names the same bytes (identical weights written by an earlier round)."""
    blobs.blob_delete(outer_name)
    if not Checkpoint.objects.filter(sha256=sha).exists():
        blobs.blob_delete(checkpoint_storage_name(sha))


def _credit_amount(run: TrainingRun) -> Decimal:
    d = run.diloco
    return Decimal(int(d["inner_steps"]) * int(d["batch_size"]) * int(d["seq_len"])) * CREDIT_PER_TOKEN


@transaction.atomic
def _aggregate_commit(round_id: int, token: str, out: _Outcome) -> Round | None:
    rnd = Round.objects.select_for_update().get(pk=round_id)
    if rnd.status != Round.Status.AGGREGATING or rnd.aggregation_token != token:
        return None
    # Round, then run: the order every other writer that takes both uses. run_cancel holds the run row.
    run = TrainingRun.objects.select_for_update().select_related("model").get(pk=rnd.run_id)
    if run.status != TrainingRun.Status.RUNNING:  # canceled while this round was being aggregated
        log.info("run %s is %s; the aggregation of round %s is discarded", run.pk, run.status, rnd.index)
        return None
    rnd.run = run
    now = timezone.now()
    step_rejected = not out.accepted
    credit = _credit_amount(run)
    report_accepted, report_rejected = [], []
    for v in out.verdicts:
        task = v.task
        task.update_norm = v.norm if _finite(v.norm) else None
        task.update_cosine = v.cosine if _finite(v.cosine) else None
        if v.accepted and not step_rejected:
            task.status, task.reason, task.credit = Task.Status.ACCEPTED, "", credit
            credit_grant(worker=task.worker, amount=credit, reason=f"run {run.pk} round {rnd.index}",
                         reference=f"task:{task.pk}")
            worker_record_outcome(worker=task.worker, valid=True, reference=f"task:{task.pk}")
            report_accepted.append({"task_id": task.pk, "worker_id": task.worker_id,
                                    "update_sha256": task.update_sha256, "norm": task.update_norm})
        elif v.accepted:
            # Passed screening but the combined step failed evaluation: no credit, and no blame either,
            # since one cannot tell whose update spoiled it.
            task.status, task.reason = Task.Status.REJECTED, f"outer step rejected: {out.reason}"
            report_rejected.append({"task_id": task.pk, "worker_id": task.worker_id,
                                    "update_sha256": task.update_sha256, "reason": task.reason})
        else:
            task.status, task.reason = Task.Status.REJECTED, v.reason
            worker_record_outcome(worker=task.worker, valid=False, reference=f"task:{task.pk}")
            report_rejected.append({"task_id": task.pk, "worker_id": task.worker_id,
                                    "update_sha256": task.update_sha256, "reason": v.reason})
        task.save(update_fields=["status", "reason", "credit", "update_norm", "update_cosine"])
    stops = {v.task.pk: (v.task.worker_id, f"round {rnd.index} was already aggregated") for v in out.verdicts}
    _tell_stopped(stops)
    _round_close_tasks(rnd, reason="the round was aggregated without it")
    rnd.aggregated_at = now
    rnd.lease_expires_at = None
    rnd.eval_loss_before, rnd.eval_loss_after = out.eval_before, out.eval_after
    rnd.timings = {k: round(v, 4) for k, v in out.timings.items()}
    if out.accepted:
        checkpoint = _checkpoint_row(sha=out.checkpoint_sha, size=out.checkpoint_size, model=run.model, run=run,
                                     round=rnd, note=f"run {run.pk} round {rnd.index}", eval_loss=out.eval_after)
        rnd.status, rnd.accepted, rnd.checkpoint_out = Round.Status.DONE, True, checkpoint
        rnd.outer_state_name = out.outer_state_name
        run.outer_state_name, run.outer_state_sha256 = out.outer_state_name, out.outer_state_sha
        run.save(update_fields=["outer_state_name", "outer_state_sha256"])
    else:
        rnd.status, rnd.accepted, rnd.reason = Round.Status.REJECTED, False, out.reason
        rnd.checkpoint_out_id = rnd.checkpoint_in_id
    rnd.save(update_fields=["status", "accepted", "reason", "checkpoint_out", "aggregated_at", "eval_loss_before",
                            "eval_loss_after", "outer_state_name", "timings", "lease_expires_at"])
    payload = {
        "run_id": run.pk, "round": rnd.index, "aggregator": rnd.aggregator,
        "accepted": report_accepted, "rejected": report_rejected,
        "eval_loss_before": out.eval_before if _finite(out.eval_before) else None,
        "eval_loss_after": out.eval_after if _finite(out.eval_after) else None,
        "checkpoint_in": rnd.checkpoint_in_id, "checkpoint": rnd.checkpoint_out_id,
    }
    if out.accepted:
        entry_append(actor=None, action="round.aggregated", subject=run.ledger_subject, payload=payload)
    else:
        entry_append(actor=None, action="round.rejected", subject=run.ledger_subject,
                     payload={**payload, "reason": out.reason})
    if rnd.index < run.total_rounds:
        _round_open(run=run, index=rnd.index + 1, checkpoint_in=rnd.checkpoint_out, now=now)
    else:
        _run_finish(run=run, final=rnd.checkpoint_out, now=now)
    return rnd


def _run_finish(*, run: TrainingRun, final: Checkpoint, now) -> None:
    run.status, run.final_checkpoint, run.finished_at = TrainingRun.Status.FINISHED, final, now
    run.save(update_fields=["status", "final_checkpoint", "finished_at"])
    model = CommunityModel.objects.select_for_update().get(pk=run.model_id)
    model.current_checkpoint = final
    m = run.spec["model"]
    model.arch, model.config = m["arch"], m["config"]
    model.save(update_fields=["current_checkpoint", "arch", "config"])
    rounds = list(run.rounds.order_by("index").values("index", "accepted", "eval_loss_before", "eval_loss_after"))
    entry_append(actor=None, action="run.finished", subject=run.ledger_subject,
                 payload={"run_id": run.pk, "model": model.slug, "final_checkpoint": final.sha256,
                          "rounds": len(rounds), "accepted_rounds": sum(1 for r in rounds if r["accepted"])})


def round_aggregate(*, round_id: int) -> Round | None:
    """Aggregate a ready round exactly once and open the next one (or finish the run).

    Returns the aggregated round, or None when the round is not ready, already aggregated, being
    aggregated by someone else, or when this attempt lost its claim while working. A round whose
    aggregation's lease lapsed is taken over here.
    """
    claimed = _round_claim_for_aggregation(round_id=round_id, now=timezone.now())
    if claimed is None:
        return None
    return _round_aggregate_claimed(*claimed)


def _round_aggregate_claimed(rnd: Round, token: str, tasks: list[Task]) -> Round | None:
    """The work and the commit of one claimed aggregation attempt."""
    round_id = rnd.pk
    lease = _Lease(round_id=round_id, token=token)
    started = time.perf_counter()
    try:
        with lease.kept():
            outcome = _aggregate_compute(rnd, token, tasks, lease=lease)
        outcome.timings["aggregation_s"] = time.perf_counter() - started  # read, screen, step, eval, write
        committed = _aggregate_commit(round_id, token, outcome)
    except _LeaseLost:
        # Whoever took the round over deleted this attempt's files already, or will; only the names unique
        # to this attempt are safe to delete here (another attempt may be writing the same checkpoint).
        log.warning("aggregation of round %s was taken over; this attempt stops", round_id)
        _attempt_files_delete(rnd.run_id, rnd.index, token, checkpoint=False)
        return None
    except Exception:
        log.exception("aggregation of round %s failed; re-opening it", round_id)
        try:
            _round_release(round_id=round_id, token=token)
        except Exception:  # the database is gone too: the lease lapses and the next check takes over
            log.exception("could not re-open round %s; its lease will lapse", round_id)
        raise
    if committed is None:
        _attempt_files_delete(rnd.run_id, rnd.index, token, checkpoint=_round_closed_without(round_id, token))
    else:
        blobs.blob_delete(_attempt_manifest_name(rnd.run_id, rnd.index, token))
    return committed


def _round_closed_without(round_id: int, token: str) -> bool:
    """Whether no attempt but this one can still write the round's step checkpoint (the round was
    canceled, failed or finished by another attempt), so this attempt may delete its own."""
    status = Round.objects.filter(pk=round_id).values_list("status", flat=True).first()
    return status is None or status in (Round.Status.CANCELED, Round.Status.FAILED, Round.Status.DONE,
                                        Round.Status.REJECTED)


@transaction.atomic
def _round_release(*, round_id: int, token: str) -> bool:
    """An attempt that failed with an error gives its round back (its files deleted) for another try."""
    rnd = Round.objects.select_for_update().get(pk=round_id)
    if rnd.status != Round.Status.AGGREGATING or rnd.aggregation_token != token:
        return False
    _round_reopen(rnd, reason="the aggregation failed with an error", now=timezone.now())
    return True


def rounds_release_stale(*, now=None) -> list[int]:
    """Re-open every round whose aggregation's lease lapsed (the beat's sweep)."""
    now = now or timezone.now()
    lapsed = Round.objects.filter(status=Round.Status.AGGREGATING).filter(
        Q(lease_expires_at__lte=now)
        | Q(lease_expires_at__isnull=True, aggregation_started_at__lte=now - timedelta(seconds=AGGREGATION_STALE_S))
        | Q(lease_expires_at__isnull=True, aggregation_started_at__isnull=True))
    return [pk for pk in lapsed.values_list("pk", flat=True) if round_take_over_if_lapsed(round_id=pk, now=now)]


def round_check(*, round_id: int, now=None) -> bool:
    """Take over a lapsed aggregation, expire late tasks, extend (or fail) a starved round, and say
    whether the round is ready to aggregate."""
    now = now or timezone.now()
    if not Round.objects.filter(pk=round_id).exists():
        return False
    round_take_over_if_lapsed(round_id=round_id, now=now)
    round_expire_late_tasks(round_id=round_id, now=now)
    round_extend_if_starved(round_id=round_id, now=now)
    rnd = Round.objects.select_related("run").get(pk=round_id)
    return rnd.status == Round.Status.OPEN and rnd.run.status == TrainingRun.Status.RUNNING and _round_ready(rnd, now)


def rounds_open_ids() -> list[int]:
    return list(Round.objects.filter(status=Round.Status.OPEN, run__status=TrainingRun.Status.RUNNING)
                .values_list("pk", flat=True))
