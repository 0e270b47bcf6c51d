"""Tasks: a worker claims one, uploads its result or reports it failed; heartbeats ask whether it is still wanted."""

from __future__ import annotations

import logging
from datetime import timedelta

import torch
from django.db import IntegrityError, transaction
from django.db.models import BooleanField, Exists, ExpressionWrapper, OuterRef, Q
from django.utils import timezone

from diloco.checkpoint import sha256_hex
from diloco.codecs import DENSITY, CodecError, decode_update, payload_nbytes
from governance.specs import SPARSE_CHUNK_BEFORE
from ledger.services import entry_append
from marketplace import tasks_liveness
from training import blobs
from training.errors import (
    InvalidUpdate,
    NotYourTask,
    TaskCompleted,
    TaskExpired,
    TaskNotOpen,
    TrainingError,
    UploadTooLarge,
)
from training.models import Round, Task, TrainingRun
from training.services.replicas import replica_claim_filter, replica_claimable
from training.services.rounds import _task_replace, _tell_stopped, round_expire_late_tasks
from training.services.versions import run_reference
from training.signals import round_result_stored

log = logging.getLogger(__name__)

_UPLOAD_HEADER_ALLOWANCE = 64 * 1024
# Pending tasks a claim looks at: the first one this worker may take is nearly always the first; a replica
# whose shard's first task is held by a worker of another device class is passed over (``replicas``).
_CLAIM_CANDIDATES = 8


def max_upload_bytes(run: TrainingRun) -> int:
    reference = run_reference(run)  # a LoRA run's updates cover its adapters only
    diloco = run.diloco
    # Sparse offsets in int16, the larger form: agents of the previous release send it, newer ones Elias–Fano.
    # Chunks: the run's, and 4096, which agents from before ``sparse_chunk`` use whatever the run says (on a
    # large model its 8x more scales make the larger update).
    chunks = {diloco.get("sparse_chunk", SPARSE_CHUNK_BEFORE), SPARSE_CHUNK_BEFORE}
    density = diloco.get("density", DENSITY)
    # Short chunks: min(topk, length) values, never fewer than the same share that newer agents keep.
    return (max(payload_nbytes(reference, diloco["compression"], chunk=chunk, density=density, idx="int16",
                               tail="min")
                for chunk in chunks) + 256 * len(reference) + _UPLOAD_HEADER_ALLOWANCE)


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

    Replicas (spot re-computation, ``training.services.replicas``) come after every first task, even one of a
    shard the worker lost (a round needs each shard's first task and can finish without its replicas; a
    worker that took a replica instead would hold its one live task of the round while the lost shard waits
    for nobody), and never go to a worker that holds or held the same shard's task in the other role.
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
    candidates = (
        Task.objects.filter(status=Task.Status.PENDING, round__status=Round.Status.OPEN,
                            round__run__status=TrainingRun.Status.RUNNING)
        .filter(hardware)
        .filter(~Exists(holds))
        .filter(replica_claim_filter(worker.pk))
        .annotate(lost_before=Exists(lost_shard),
                  is_replica=ExpressionWrapper(Q(replica_of__isnull=False), output_field=BooleanField()))
        .order_by("is_replica", "lost_before", "created_at", "id")
        .select_for_update(skip_locked=True, of=("self",))
    )
    # One row locked at a time, so racing claims skip only the rows really taken.
    passed_over: list[int] = []
    for _ in range(_CLAIM_CANDIDATES):
        task = candidates.exclude(pk__in=passed_over).first()
        if task is None or replica_claimable(task, worker):
            break
        passed_over.append(task.pk)
        task = None
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
    try:
        return decode_update(data, run_reference(run))
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
    base = metrics.get("base_checkpoint_sha256")
    if base is not None and base != task.round.checkpoint_in_id:
        raise TrainingError(f"metrics.base_checkpoint_sha256: the update is measured from {base}, not from the "
                            f"task's checkpoint {task.round.checkpoint_in_id}", code="stale_base")
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
                                  "update_sha256": sha, "size": len(data), "codec": run.diloco.get("compression"),
                                  "metrics": metrics})
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


def _enqueue_round_check(round_id: int) -> None:
    """Runs after commit: asks for a round check through ``training.signals`` (the receiver enqueues the
    Celery task, logging a broker hiccup rather than raising it: the tick catches up)."""
    round_result_stored.send(sender=Task, round_id=round_id)
