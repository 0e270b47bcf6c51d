"""Aggregating a round exactly once: claim, compute (``diloco.round``), commit.

Heavy tensor work (decoding, screening, aggregating, evaluating, writing checkpoints) happens outside
database transactions; the transactions only lock a row, check its state and write the outcome.
Aggregation is made exactly-once by a claim token: a round moves ``open -> aggregating`` under a row
lock with a fresh token, the work happens unlocked, and the result is committed only if the round is
still ``aggregating`` with that same token (see ``rounds`` for the lease that backs the claim). A late
finisher of a taken-over attempt finds a new token and commits nothing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal

import torch
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from diloco.codecs import CodecError, decode_update
from diloco.contributions import check_contributions, step_sketch
from diloco.evaluate import eval_dtype, evaluate_loss
from diloco.outer import OuterOptimizer
from diloco.replay import sketch_to_json
from diloco.round import (
    REFERENCE_ROUNDS,
    AggregatorSpec,
    OuterSpec,
    ScreenSpec,
    Update,
    Verdict,
    outer_round,
    reference_norms,
)
from diloco.sparse import momentum_roles
from ledger.services import entry_append
from marketplace.services import credit_grant, worker_record_outcome
from training import blobs
from training.models import Round, Task, TrainingRun
from training.services import contributions, replicas
from training.services.checkpoints import _checkpoint_row, _discard_step, _model_meta, _save_step
from training.services.datasets import run_heldout_tokens
from training.services.deltas import delta_fields, delta_publish, delta_record, publish_mode
from training.services.rounds import (
    _attempt_files_delete,
    _attempt_manifest_name,
    _attempt_outer_name,
    _lapsed_reason,
    _Lease,
    _lease_lapsed,
    _LeaseLost,
    _round_close_tasks,
    _round_open,
    _round_ready,
    _round_reopen,
    _tell_stopped,
    aggregation_lease_s,
)
from training.services.runs import _run_finish
from training.services.versions import _version_publish, run_model_with_weights, run_reference

log = logging.getLogger(__name__)

# A step whose held-out loss rises by more than this fraction (or is not finite) is rejected.
EVAL_TOLERANCE = 0.10
EVAL_BATCHES = 8
# Screening: an update whose norm is this many times the median (this round's, or the last round's
# accepted updates') is rejected.
MAX_NORM_RATIO = 5.0
# The trimmed mean's trim for specs frozen before the spec named it.
TRIM_FRACTION = 0.25
# Credits are kilotokens of inner training, computed from the spec (not from what the worker reports).
CREDIT_PER_TOKEN = Decimal("0.001")


@dataclass
class _Outcome:
    verdicts: list[Verdict]  # ``Verdict.id`` is the task's id
    tasks: dict[int, Task]
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
    step_sketch: list[float] | None = None  # of the accepted outer step θ_in − θ_out
    published_delta: dict | None = None  # the step agents download instead of the checkpoint (``deltas``)


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


def _previous_accepted_norms(rnd: Round) -> list[float]:
    """The norms that bound this round's (``diloco.round.reference_norms``): those of the updates accepted
    in the run's latest ``REFERENCE_ROUNDS`` accepted rounds before it, pooled."""
    indices = list(Round.objects.filter(run_id=rnd.run_id, index__lt=rnd.index, accepted=True)
                   .order_by("-index").values_list("index", flat=True)[:REFERENCE_ROUNDS])
    by_round: dict[int, list[float]] = {index: [] for index in indices}
    for index, norm in (Task.objects.filter(round__run_id=rnd.run_id, round__index__in=indices,
                                            status=Task.Status.ACCEPTED, update_norm__isnull=False)
                        .values_list("round__index", "update_norm")):
        by_round[index].append(norm)
    return reference_norms([by_round[index] for index in sorted(by_round)])


def eval_precision() -> torch.dtype | None:
    """The autocast dtype of held-out evaluation (``AGORA_EVAL_PRECISION``); None is fp32."""
    return eval_dtype(getattr(settings, "AGORA_EVAL_PRECISION", "auto") or "auto", eval_device())


def _eval(state: dict, run: TrainingRun, tokens) -> float:
    device = eval_device()
    model = run_model_with_weights(run, state).to(device)  # a LoRA run's state is its adapters
    d = run.diloco
    return evaluate_loss(model, tokens, batch_size=int(d["batch_size"]), seq_len=int(d["seq_len"]),
                         batches=EVAL_BATCHES, seed=0, device=device, autocast_dtype=eval_precision())


def _aggregate_compute(rnd: Round, token: str, tasks: list[Task], *, lease: _Lease | None = None) -> _Outcome:
    """The tensor work of one round: decode the results and hand them to ``diloco.round.outer_round``.

    Blobs written here are content addressed (checkpoint) or unique to this attempt (outer state); before
    writing them the attempt lists them in its manifest, so whoever takes over a dead attempt can delete
    them. With a ``lease`` it is renewed at each phase boundary, raising ``_LeaseLost`` once another
    attempt holds the round."""
    run = rnd.run
    d = run.diloco
    renew = lease.renew if lease is not None else (lambda: None)
    t0 = time.perf_counter()
    state_in, _meta_in = blobs.checkpoint_state(rnd.checkpoint_in_id)
    m = run.spec["model"]
    reference = run_reference(run)
    updates = []
    for task in tasks:
        try:
            updates.append(Update(task.pk, decode_update(blobs.blob_read(task.update_name), reference)))
        except (CodecError, OSError) as exc:  # validated at upload; only storage trouble lands here
            updates.append(Update(task.pk, None, str(exc)))
    decode_s = time.perf_counter() - t0
    plan = replicas.replica_plan(tasks, updates)  # an agreeing replica enters once, as its twin
    renew()
    tokens = run_heldout_tokens(run)
    outer_name = _attempt_outer_name(run.pk, rnd.index, token)
    meta = _model_meta(m["arch"], m["config"], run_id=run.pk, round=rnd.index)
    overlap = _overlap_eval_with_writes()
    step: dict = {}

    def on_step(new_state: dict, opt: OuterOptimizer) -> None:
        step["save"] = functools.partial(_save_step, new_state, meta, opt.state_tensors(copy=False), outer_name,
                                         manifest_name=_attempt_manifest_name(run.pk, rnd.index, token))
        step["t"] = time.perf_counter()
        step["delta"] = opt.last_delta  # the exact step d, when the run publishes its steps
        if overlap:
            # The new weights and optimizer state are serialised, hashed and written while the held-out
            # loss is evaluated; a step the evaluation turns down has its blobs removed again.
            step["saving"] = pool.submit(step["save"])

    def evaluate(state: dict) -> float:
        if "saving" in step:
            with _one_core_spared():
                return _eval(state, run, tokens)
        return _eval(state, run, tokens)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="agora-save") as pool:
        try:
            result = outer_round(
                base_state=state_in, updates=plan.updates, evaluate=evaluate,
                aggregator=AggregatorSpec(d["aggregator"], float(d.get("trim_fraction", TRIM_FRACTION))),
                outer=OuterSpec(lr=float(d["outer_lr"]), momentum=momentum_roles(d["compression"], float(
                    d["outer_momentum"]))[0], nesterov=True,
                                publish=publish_mode(d)),
                outer_state=blobs.outer_state(run.outer_state_name) if run.outer_state_name else None,
                previous_norms=_previous_accepted_norms(rnd), screening=ScreenSpec(max_norm_ratio=MAX_NORM_RATIO),
                eval_before=_previous_eval(rnd), eval_tolerance=EVAL_TOLERANCE, on_phase=lambda _phase: renew(),
                on_step=on_step, contributions=plan.stage(_contribution_stage(run, rnd, tasks, state_in, updates)))
        finally:
            saved = step["saving"].result() if "saving" in step else None
    plan.settle(result.verdicts)
    timings = {"decode_s": decode_s, **result.timings}
    by_id = {task.pk: task for task in tasks}
    if not result.accepted:
        if saved:
            _discard_step(saved[0], outer_name)
        if "t" in step:
            timings["eval_and_save_s"] = time.perf_counter() - step["t"]
        return _Outcome(result.verdicts, by_id, False, result.reason, result.eval_before, result.eval_after,
                        timings=timings)
    sha, size, outer_sha, save_timings = saved or step["save"]()
    published = delta_publish(state_in=state_in, state_out=result.new_state, step=step.get("delta"),
                              sha_in=rnd.checkpoint_in_id, sha_out=sha, meta_out=meta, checkpoint_size=size)
    timings.update(save_timings)
    timings["eval_and_save_s"] = time.perf_counter() - step["t"]
    return _Outcome(result.verdicts, by_id, True, "", result.eval_before, result.eval_after,
                    new_state=result.new_state, checkpoint_sha=sha, checkpoint_size=size,
                    step_sketch=_step_sketch(run, state_in, result.new_state), published_delta=published,
                    outer_state_name=outer_name, outer_state_sha=outer_sha, timings=timings)


def _contribution_stage(run: TrainingRun, rnd: Round, tasks: list[Task], state_in: dict, updates: list[Update]):
    """The replay and score checks of ``diloco.contributions`` for ``outer_round`` (None when
    ``AGORA_SCORE_CONTRIBUTIONS`` is off or there is nothing to check)."""
    if not contributions.enabled() or not any(u.tensors is not None for u in updates):
        return None
    check = contributions.contribution_check(run=run, rnd=rnd, tasks=tasks, device=eval_device(),
                                             autocast_dtype=eval_precision())
    return lambda ups, verdicts: check_contributions(state_in, ups, verdicts, check)


def _step_sketch(run: TrainingRun, state_in: dict, new_state: dict) -> list[float] | None:
    if not contributions.enabled():
        return None
    s = step_sketch(state_in, new_state, seed=contributions.sketch_seed(run.pk))
    return sketch_to_json(s) if s is not None else None


def _sketch_json(v: Verdict) -> list[float] | None:
    s = v.extra.get("sketch")
    return sketch_to_json(s) if s is not None else None


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
    credit = _credit_amount(run)
    report_accepted, report_rejected = [], []
    for v in out.verdicts:
        task = out.tasks[v.id]
        task.update_norm = v.norm if _finite(v.norm) else None
        task.update_cosine = v.cosine if _finite(v.cosine) else None
        task.score, task.update_sketch = v.score, _sketch_json(v)
        if v.credited(step_accepted=out.accepted):
            task.status, task.reason, task.credit = Task.Status.ACCEPTED, "", credit
            credit_grant(worker=task.worker, amount=credit, reason=f"run {run.pk} round {rnd.index}",
                         reference=f"task:{task.pk}")
            worker_record_outcome(worker=task.worker, valid=True, reference=f"task:{task.pk}")
            report_accepted.append({"task_id": task.pk, "worker_id": task.worker_id,
                                    "update_sha256": task.update_sha256, "norm": task.update_norm,
                                    "score": task.score})
            task.save(update_fields=["status", "reason", "credit", "update_norm", "update_cosine", "score",
                                     "update_sketch"])
            continue
        # Passed screening but the combined step failed evaluation: no credit, and no blame either, since
        # one cannot tell whose update spoiled it; a norm or direction rejection is blamed only when the
        # evaluation confirmed the round that judged it (``Verdict.blamed``).
        task.status = Task.Status.REJECTED
        task.reason = f"outer step rejected: {out.reason}" if v.accepted else v.reason
        blamed = v.blamed(step_accepted=out.accepted)
        if blamed:
            worker_record_outcome(worker=task.worker, valid=False, reference=f"task:{task.pk}")
        report_rejected.append({"task_id": task.pk, "worker_id": task.worker_id, "update_sha256": task.update_sha256,
                                "reason": task.reason, "code": v.code, "blamed": blamed, "score": task.score})
        task.save(update_fields=["status", "reason", "credit", "update_norm", "update_cosine", "score",
                                 "update_sketch"])
    replicas.replicas_record(run=run, rnd=rnd, verdicts=out.verdicts, tasks=out.tasks)
    stops = {v.id: (out.tasks[v.id].worker_id, f"round {rnd.index} was already aggregated") for v in out.verdicts}
    _tell_stopped(stops)
    _round_close_tasks(rnd, reason="the round was aggregated without it")
    rnd.aggregated_at = now
    rnd.lease_expires_at = None
    rnd.eval_loss_before, rnd.eval_loss_after = out.eval_before, out.eval_after
    rnd.timings = {k: round(v, 4) for k, v in out.timings.items()}
    rnd.step_sketch = out.step_sketch if out.accepted else None
    if out.accepted:
        checkpoint = _checkpoint_row(sha=out.checkpoint_sha, size=out.checkpoint_size, model=run.model, run=run,
                                     round=rnd, note=f"run {run.pk} round {rnd.index}", eval_loss=out.eval_after)
        delta_record(checkpoint=checkpoint, delta=out.published_delta)
        rnd.status, rnd.accepted, rnd.checkpoint_out = Round.Status.DONE, True, checkpoint
        _version_publish(run=run, rnd=rnd, checkpoint=checkpoint, eval_loss=out.eval_after, now=now)
        rnd.outer_state_name = out.outer_state_name
        run.outer_state_name, run.outer_state_sha256 = out.outer_state_name, out.outer_state_sha
        run.save(update_fields=["outer_state_name", "outer_state_sha256"])
    else:
        rnd.status, rnd.accepted, rnd.reason = Round.Status.REJECTED, False, out.reason
        rnd.checkpoint_out_id = rnd.checkpoint_in_id
    rnd.save(update_fields=["status", "accepted", "reason", "checkpoint_out", "aggregated_at", "eval_loss_before",
                            "eval_loss_after", "outer_state_name", "timings", "lease_expires_at", "step_sketch"])
    payload = {
        "run_id": run.pk, "round": rnd.index, "aggregator": rnd.aggregator,
        "accepted": report_accepted, "rejected": report_rejected,
        "eval_loss_before": out.eval_before if _finite(out.eval_before) else None,
        "eval_loss_after": out.eval_after if _finite(out.eval_after) else None,
        "checkpoint_in": rnd.checkpoint_in_id, "checkpoint": rnd.checkpoint_out_id,
        "checkpoint_sha256": rnd.checkpoint_out_id, **delta_fields(rnd.checkpoint_out if out.accepted else None),
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
