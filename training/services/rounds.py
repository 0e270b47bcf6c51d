"""Rounds: opening, deadlines and late tasks, extensions, failed attempts, and the aggregation lease.

Rounds always make progress: a worker whose task failed or expired may take another task of the same
round; a round short of ``min_workers`` results is extended at most ``diloco.max_round_extensions``
times, then that attempt fails (``round.failed``) and the round is tried again, until the run has had
more than ``diloco.max_failed_rounds`` failed attempts and fails itself (``run.failed``).

An aggregation holds its round by a claim token with a lease (``AGORA_AGGREGATION_LEASE_S``), renewed
from a keep-alive thread and at every phase boundary (``_Lease``); a crashed aggregation's lease lapses
and the next round check or tick takes the round over (``round_take_over_if_lapsed``), deleting the dead
attempt's files.

Every change of a task's state tells ``marketplace.tasks_liveness`` after it commits, so a heartbeat
naming a task that is no longer wanted answers ``stop_task`` without a query.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import connections, transaction
from django.db.models import Q
from django.utils import timezone

from ledger.services import entry_append
from marketplace import tasks_liveness
from training import blobs
from training.models import Checkpoint, Round, Task, TrainingRun, checkpoint_storage_name
from training.services.replicas import replicas_in_flight, replicas_issue, round_results

log = logging.getLogger(__name__)

# The longest an aggregation may run (Celery's time limits derive from it); a round still aggregating
# after this long without a lease (rows from before leases) is presumed dead.
AGGREGATION_STALE_S = 900
# Defaults of the spec's round-failure rules, for specs frozen before the rules existed.
DEFAULT_MAX_ROUND_EXTENSIONS = 3
DEFAULT_MAX_FAILED_ROUNDS = 2


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
    replicas_issue(rnd=rnd, now=now)
    run.current_round = index
    run.status = TrainingRun.Status.RUNNING
    run.save(update_fields=["current_round", "status"])
    entry_append(actor=None, action="round.opened", subject=run.ledger_subject,
                 payload={"run_id": run.pk, "round": index, "checkpoint": checkpoint_in.sha256, "tasks": k,
                          "deadline": rnd.deadline.isoformat()})
    return rnd


def _tell_stopped(stops: dict[int, tuple[int | None, str]]) -> None:
    """After commit, tell heartbeats that these tasks (``{task_id: (worker_id, reason)}``) are not wanted."""
    if stops:
        stops = dict(stops)
        transaction.on_commit(lambda: tasks_liveness.mark_stopped(stops))


def _task_replace(task: Task, rnd: Round) -> Task:
    now = timezone.now()
    run = rnd.run
    return Task.objects.create(
        round=rnd, shard_index=task.shard_index, seed=task.seed, replaces=task, replica_of_id=task.replica_of_id,
        created_at=now,
        deadline=now + timedelta(seconds=int(run.diloco["round_timeout_s"])),
    )


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
    done = round_results(rnd)
    if done >= int(d["workers_per_round"]):
        return now >= rnd.deadline or not replicas_in_flight(rnd, now)
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
    done = round_results(rnd)
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
