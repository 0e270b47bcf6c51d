"""Training services: runs from approved proposals, rounds, task claims and results, aggregation.

Heavy tensor work (initial weights, decoding, aggregating, evaluating, writing checkpoints) happens
outside database transactions; the transactions only lock a row, check its state and write the outcome.
Aggregation is made exactly-once by a claim token: a round moves ``open -> aggregating`` under a row
lock with a fresh token, the work happens unlocked, and the result is committed only if the round is
still ``aggregating`` with that same token. A crashed aggregation is re-opened by the tick after
``AGGREGATION_STALE_S`` and done again; a late finisher of the old attempt then finds a new token and
commits nothing.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal

import torch
from django.conf import settings
from django.db import IntegrityError, transaction
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
# An aggregation that has not committed after this long is presumed dead and the round re-opened.
AGGREGATION_STALE_S = 900
EVAL_BATCHES = 8
# Screening: an update whose norm is this many times the median (this round's, or the last round's
# accepted updates') is rejected.
MAX_NORM_RATIO = 5.0
# Credits are kilotokens of inner training, computed from the spec (not from what the worker reports).
CREDIT_PER_TOKEN = Decimal("0.001")
_UPLOAD_HEADER_ALLOWANCE = 64 * 1024


# --- checkpoints and models ---------------------------------------------------------------------


def _checkpoint_blob(state: dict[str, torch.Tensor], meta: dict) -> tuple[str, int]:
    """Write weights content-addressed; returns (sha256, size). Safe to repeat, safe outside transactions."""
    data = save_weights(state, meta)
    sha = sha256_hex(data)
    blobs.blob_write(checkpoint_storage_name(sha), data, content_addressed=True)
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

    Open tasks expire at once, so agents stop getting work from the run and their uploads are refused
    (410); an aggregation already under way commits nothing (see ``_aggregate_commit``).
    """
    if by is None or not getattr(by, "is_authenticated", False) or not by.is_staff:
        raise RunForbidden("only staff can cancel a training run")
    reason = (reason or "").strip()
    if not reason:
        raise serializers.ValidationError({"reason": ["Canceling a run needs a reason; it is published in the ledger."]})
    if len(reason) > MAX_CANCEL_REASON:
        raise serializers.ValidationError({"reason": [f"At most {MAX_CANCEL_REASON} characters."]})
    run = TrainingRun.objects.select_for_update().filter(pk=run_id).first()
    if run is None:
        raise TrainingError(f"there is no run {run_id}", code="not_found", http_status=404)
    if not run.is_active:
        raise RunError(f"only a pending or running run can be canceled, not a {run.status} one")
    run.status, run.reason, run.finished_at = TrainingRun.Status.CANCELED, reason, timezone.now()
    run.save(update_fields=["status", "reason", "finished_at"])
    Task.objects.filter(round__run=run, status__in=[Task.Status.PENDING, Task.Status.ASSIGNED]).update(
        status=Task.Status.EXPIRED, reason="run canceled")
    entry_append(actor=by, action="run.canceled", subject=run.ledger_subject, payload={"reason": reason})
    return run


# --- tasks: claim, result, fail ------------------------------------------------------------------


def max_upload_bytes(run: TrainingRun) -> int:
    m = run.spec["model"]
    reference = blobs.model_reference(m["arch"], m["config"])
    return payload_nbytes(reference, run.diloco["compression"]) + 256 * len(reference) + _UPLOAD_HEADER_ALLOWANCE


@transaction.atomic
def task_claim(*, worker) -> Task | None:
    """Assign the oldest pending task this worker may take, or None.

    Eligible: the run is running and its hardware requirements admit the worker (GPU memory at least
    ``min_vram_mb``; a CPU-only worker only where ``allow_cpu``), and the worker holds no task of that
    round yet. Rows are locked with ``SKIP LOCKED`` on PostgreSQL so concurrent claims never collide;
    SQLite serialises writers anyway. The unique (round, worker) constraint backs the last rule.
    """
    from marketplace.models import Worker

    worker = Worker.objects.only("id", "gpus", "status").get(pk=worker.pk)
    if worker.status != Worker.Status.ACTIVE:
        return None
    vram = worker.max_vram_mb
    hardware = Q(round__run__allow_cpu=True) if vram <= 0 else Q(round__run__min_vram_mb__lte=vram)
    holds = Task.objects.filter(round_id=OuterRef("round_id"), worker_id=worker.pk)
    now = timezone.now()
    task = (
        Task.objects.filter(status=Task.Status.PENDING, round__status=Round.Status.OPEN,
                            round__run__status=TrainingRun.Status.RUNNING)
        .filter(hardware)
        .filter(~Exists(holds))
        .order_by("created_at", "id")
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
    task.round = rnd
    return task


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
            blobs.blob_write(name, data)
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
    except BaseException:
        if written:
            blobs.blob_delete(name)
        raise
    return task


@transaction.atomic
def task_fail(*, task_id: int, worker, reason: str) -> Task:
    """The worker gives the task up; a replacement for the same shard goes to another worker."""
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
    from training.tasks import round_check

    try:
        round_check.delay(round_id)
    except Exception:
        log.exception("could not enqueue the check of round %s; the next tick will do it", round_id)


@transaction.atomic
def round_expire_late_tasks(*, round_id: int, now=None) -> list[int]:
    """Mark assigned tasks past their deadline expired and issue each shard again to another worker."""
    now = now or timezone.now()
    rnd = Round.objects.select_for_update().select_related("run").get(pk=round_id)
    if rnd.status != Round.Status.OPEN:
        return []
    expired = []
    for task in Task.objects.select_for_update().filter(round=rnd, status=Task.Status.ASSIGNED, deadline__lte=now):
        task.status, task.reason = Task.Status.EXPIRED, "deadline passed without a result"
        task.save(update_fields=["status", "reason"])
        replacement = _task_replace(task, rnd)
        entry_append(actor=None, action="task.expired", subject=rnd.run.ledger_subject,
                     payload={"task_id": task.pk, "run_id": rnd.run_id, "round": rnd.index, "shard": task.shard_index,
                              "worker_id": task.worker_id, "replacement_task_id": replacement.pk})
        expired.append(task.pk)
    return expired


def _round_ready(rnd: Round, now) -> bool:
    d = rnd.run.diloco
    done = Task.objects.filter(round=rnd, status=Task.Status.COMPLETED).count()
    if done >= int(d["workers_per_round"]):
        return True
    return now >= rnd.deadline and done >= int(d["min_workers"])


@transaction.atomic
def round_extend_if_starved(*, round_id: int, now=None) -> bool:
    """Past the deadline with fewer than ``min_workers`` results: give the round another timeout."""
    now = now or timezone.now()
    rnd = Round.objects.select_for_update().select_related("run").get(pk=round_id)
    if rnd.status != Round.Status.OPEN or now < rnd.deadline or _round_ready(rnd, now):
        return False
    d = rnd.run.diloco
    rnd.deadline = now + timedelta(seconds=int(d["round_timeout_s"]))
    rnd.save(update_fields=["deadline"])
    done = Task.objects.filter(round=rnd, status=Task.Status.COMPLETED).count()
    entry_append(actor=None, action="round.extended", subject=rnd.run.ledger_subject,
                 payload={"run_id": rnd.run_id, "round": rnd.index, "results": done,
                          "min_workers": int(d["min_workers"]), "deadline": rnd.deadline.isoformat()})
    return True


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


@transaction.atomic
def _round_claim_for_aggregation(*, round_id: int, now) -> tuple[Round, str, list[Task]] | None:
    rnd = Round.objects.select_for_update().select_related("run").filter(pk=round_id).first()
    if rnd is None or rnd.status != Round.Status.OPEN or rnd.run.status != TrainingRun.Status.RUNNING \
            or not _round_ready(rnd, now):
        return None
    token = uuid.uuid4().hex
    rnd.status, rnd.aggregation_token, rnd.aggregation_started_at = Round.Status.AGGREGATING, token, now
    rnd.save(update_fields=["status", "aggregation_token", "aggregation_started_at"])
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


def _aggregate_compute(rnd: Round, token: str, tasks: list[Task]) -> _Outcome:
    """The tensor work of one round, no database writes. Blobs written here are content addressed
    (checkpoint) or unique to this attempt (outer state)."""
    run = rnd.run
    d = run.diloco
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
    t = time.perf_counter()
    outer_name = f"outer/run-{run.pk}/round-{rnd.index}-{token}.safetensors"
    meta = _model_meta(m["arch"], m["config"], run_id=run.pk, round=rnd.index)
    save = functools.partial(_save_step, new_state, meta, opt.state_tensors(copy=False), outer_name)
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


def _save_step(new_state: dict, meta: dict, outer_tensors: dict, outer_name: str) -> tuple[str, int, str, dict]:
    """Write a step's checkpoint (content addressed) and outer optimizer state; returns
    (checkpoint sha256, checkpoint size, outer state sha256, timings)."""
    t = time.perf_counter()
    sha, size = _checkpoint_blob(new_state, meta)
    t_outer = time.perf_counter()
    outer_bytes = save_weights(outer_tensors, {"run_id": meta.get("run_id"), "round": meta.get("round")})
    blobs.blob_write(outer_name, outer_bytes)
    blobs.remember_outer_state(outer_name, outer_tensors)
    done = time.perf_counter()
    return sha, size, sha256_hex(outer_bytes), {"save_checkpoint_s": t_outer - t, "save_outer_state_s": done - t_outer}


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
    Task.objects.filter(round=rnd, status__in=[Task.Status.PENDING, Task.Status.ASSIGNED]).update(
        status=Task.Status.EXPIRED, reason="the round was aggregated without it")
    rnd.aggregated_at = now
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
                            "eval_loss_after", "outer_state_name", "timings"])
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
    aggregated by someone else, or when this attempt lost its claim while working.
    """
    claimed = _round_claim_for_aggregation(round_id=round_id, now=timezone.now())
    if claimed is None:
        return None
    rnd, token, tasks = claimed
    started = time.perf_counter()
    try:
        outcome = _aggregate_compute(rnd, token, tasks)
        outcome.timings["aggregation_s"] = time.perf_counter() - started  # read, screen, step, eval, write
    except Exception:
        log.exception("aggregation of round %s failed; re-opening it", round_id)
        _round_release(round_id=round_id, token=token)
        raise
    committed = _aggregate_commit(round_id, token, outcome)
    if committed is None and outcome.outer_state_name:
        blobs.blob_delete(outcome.outer_state_name)
    return committed


@transaction.atomic
def _round_release(*, round_id: int, token: str | None = None) -> bool:
    rnd = Round.objects.select_for_update().get(pk=round_id)
    if rnd.status != Round.Status.AGGREGATING or (token is not None and rnd.aggregation_token != token):
        return False
    rnd.status, rnd.aggregation_token, rnd.aggregation_started_at = Round.Status.OPEN, "", None
    rnd.save(update_fields=["status", "aggregation_token", "aggregation_started_at"])
    return True


def rounds_release_stale(*, now=None) -> list[int]:
    now = now or timezone.now()
    stale = Round.objects.filter(status=Round.Status.AGGREGATING,
                                 aggregation_started_at__lt=now - timedelta(seconds=AGGREGATION_STALE_S))
    return [pk for pk in stale.values_list("pk", flat=True) if _round_release(round_id=pk)]


def round_check(*, round_id: int, now=None) -> bool:
    """Expire late tasks, extend a starved round, and say whether the round is ready to aggregate."""
    now = now or timezone.now()
    if not Round.objects.filter(pk=round_id).exists():
        return False
    round_expire_late_tasks(round_id=round_id, now=now)
    round_extend_if_starved(round_id=round_id, now=now)
    rnd = Round.objects.select_related("run").get(pk=round_id)
    return rnd.status == Round.Status.OPEN and rnd.run.status == TrainingRun.Status.RUNNING and _round_ready(rnd, now)


def rounds_open_ids() -> list[int]:
    return list(Round.objects.filter(status=Round.Status.OPEN, run__status=TrainingRun.Status.RUNNING)
                .values_list("pk", flat=True))
