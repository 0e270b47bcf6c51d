"""Spot re-computation: a sampled fraction of a round's tasks is done twice, by two workers, and compared.

- Issue (``replicas_issue``, when a round opens): each shard is sampled with probability
  ``diloco.replica_fraction`` from a seed derived from ``SECRET_KEY``, the run and the round, so workers
  cannot tell which tasks are checked. A sampled shard gets a replica task: the same checkpoint, shard, seed
  and inner settings, ``replica_of`` its first task. Agents keep AdamW's state from round to round, so both
  tasks of a sampled shard (and as many decoys) say ``"optimizer": "fresh"`` (``task_optimizer``).
- Claim (``replica_claim_filter``, used by ``assignment.task_claim``): a replica goes only to a worker that
  holds no task of that shard in the round, once another worker with the same device (a CPU, or the same
  GPU model: bf16 on a GPU rounds differently from fp32 on a CPU, and kernels differ between GPU models)
  holds the shard's first task. Primaries come first.
- Readiness (``round_results``): a round counts shards with a result, so a replica that arrives first stands
  in for its shard; with every shard in, the round still waits for a replica being trained, until the
  round's deadline. A replica nobody claims never delays anything.
- Aggregate (``ReplicaPlan``): a pair that agrees (``diloco.replica.compare``) enters the round once, and the
  replica earns what its twin earns. A pair that disagrees goes through screening and the contribution
  checks side by side; the one the round favours (``diloco.replica.favoured``) is kept and the other is
  turned away with code ``replica_mismatch``, no credit, and blame once the step is accepted. Both tasks of a
  pair start AdamW afresh, and an agent never trains ahead of such a task (a head start carries the resumed
  state), so a pair whose metrics claim steps trained ahead (``overlap_steps``) is compared like any other:
  a worker cannot dodge the check by claiming them.
- Record (``replicas_record``, in the aggregation's transaction): both tasks keep ``replica_check``; the
  ledger gets ``round.replicas`` (the sampled shards and every pair's outcome) and ``task.replica_mismatch``
  per disagreement.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
from collections.abc import Callable, Hashable, Sequence

from django.conf import settings
from django.db.models import Count, Exists, OuterRef, Q

from diloco.replica import (
    Agreement,
    Side,
    Tolerance,
    centre_cosine,
    compare,
    favoured,
    robust_centre,
    sample_shards,
)
from diloco.round import Update, Verdict
from ledger.services import entry_append
from training.models import Round, Task, TrainingRun

REPLICA_MISMATCH = "replica_mismatch"
REPLICA_UNCLAIMED = "no other worker with the same device was free to re-compute this shard before the round closed"


def replica_fraction(run: TrainingRun) -> float:
    """The run's ``diloco.replica_fraction``; specs frozen before the setting existed have none. A sparse codec
    (top-k) sends what each worker's own error-feedback buffer lets through, so two workers' uploads of the
    same task differ by design: such runs are not spot-checked."""
    if str(run.diloco.get("compression", "")).startswith("topk"):
        return 0.0
    return float(run.diloco.get("replica_fraction", 0.0) or 0.0)


def replica_seed(run_id: int, round_index: int) -> int:
    digest = hmac.new(settings.SECRET_KEY.encode(), f"agora:replicas:{run_id}:{round_index}".encode(),
                      hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def replica_shards(run: TrainingRun, round_index: int) -> list[int]:
    """The shards of round ``round_index`` that get a replica (secret until the round is aggregated)."""
    return sample_shards(seed=replica_seed(run.pk, round_index), shards=int(run.diloco["workers_per_round"]),
                         fraction=replica_fraction(run))


def task_optimizer(task: Task) -> str:
    """The task payload's ``optimizer``: "fresh" tells the agent to start AdamW afresh instead of resuming its
    saved state of the run, so a task and its replica are the same computation. Every task of a sampled shard
    is fresh, and as many other shards again by a second secret draw, so a worker handed a fresh task cannot
    tell whether it is checked (about even odds at any fraction up to 0.5)."""
    run, index = task.round.run, task.round.index
    if replica_fraction(run) <= 0:
        return "resume"
    decoys = sample_shards(seed=replica_seed(run.pk, index) ^ 0x5EED, shards=int(run.diloco["workers_per_round"]),
                           fraction=replica_fraction(run))
    return "fresh" if task.shard_index in set(replica_shards(run, index)) | set(decoys) else "resume"


def tolerance() -> Tolerance:
    return Tolerance(cosine=float(getattr(settings, "AGORA_REPLICA_COSINE", Tolerance.cosine)),
                     norm_rel=float(getattr(settings, "AGORA_REPLICA_NORM_REL", Tolerance.norm_rel)))


def replicas_issue(*, rnd: Round, now) -> list[Task]:
    """Create the replica tasks of a round that was just opened (inside the caller's transaction). Nothing goes
    to the ledger here: which shards are checked is published with the round's outcome."""
    shards = set(replica_shards(rnd.run, rnd.index))
    if not shards:
        return []
    firsts = Task.objects.filter(round=rnd, replica_of__isnull=True, shard_index__in=shards).order_by("shard_index")
    return Task.objects.bulk_create(
        Task(round=rnd, shard_index=t.shard_index, seed=t.seed, replica_of=t, deadline=t.deadline, created_at=now)
        for t in firsts
    )


def device_class(worker) -> str:
    """What a worker computes on, as far as rounding goes: "cpu", or its first GPU's model."""
    gpus = worker.gpus or []
    if not gpus or worker.max_vram_mb <= 0:
        return "cpu"
    return f"gpu:{gpus[0].get('name') or '?'}"


def replica_claim_filter(worker_id: int) -> Q:
    """Which pending tasks ``worker_id`` may take as far as replicas go: never a task of a shard it holds or
    held in the other role in that round, and a replica only once another worker holds the shard's first task
    (see ``replica_claimable`` for the device class)."""
    mine = Task.objects.filter(round_id=OuterRef("round_id"), shard_index=OuterRef("shard_index"), worker_id=worker_id)
    held_by_other = (Task.objects.filter(round_id=OuterRef("round_id"), shard_index=OuterRef("shard_index"),
                                         replica_of__isnull=True, worker_id__isnull=False,
                                         status__in=[Task.Status.ASSIGNED, Task.Status.COMPLETED])
                     .exclude(worker_id=worker_id))
    primary = Q(replica_of__isnull=True) & ~Exists(mine.filter(replica_of__isnull=False))
    replica = Q(replica_of__isnull=False) & ~Exists(mine.filter(replica_of__isnull=True)) & Exists(held_by_other)
    return primary | replica


def replica_claimable(task: Task, worker) -> bool:
    """A replica goes to a worker with the same device as the one holding its shard's first task."""
    if task.replica_of_id is None:
        return True
    holder = (Task.objects.filter(round_id=task.round_id, shard_index=task.shard_index, replica_of__isnull=True,
                                  status__in=[Task.Status.ASSIGNED, Task.Status.COMPLETED])
              .exclude(worker_id=worker.pk).select_related("worker").first())
    return holder is not None and device_class(holder.worker) == device_class(worker)


def round_results(rnd: Round) -> int:
    """Shards of the round with a result in (a replica stands in for its shard)."""
    return (Task.objects.filter(round=rnd, status=Task.Status.COMPLETED)
            .aggregate(n=Count("shard_index", distinct=True))["n"])


def replicas_in_flight(rnd: Round, now) -> bool:
    """Whether a replica of a shard whose result is in is still being trained within its deadline."""
    done = Task.objects.filter(round=rnd, status=Task.Status.COMPLETED).values("shard_index")
    return Task.objects.filter(round=rnd, replica_of__isnull=False, status=Task.Status.ASSIGNED, deadline__gt=now,
                               shard_index__in=done).exists()


# --- aggregation -------------------------------------------------------------------------------


@dataclasses.dataclass
class _Pair:
    first: int  # task ids
    second: int
    agreement: Agreement


@dataclasses.dataclass
class ReplicaPlan:
    """How a round's replica pairs enter ``diloco.round.outer_round``: ``updates`` is what goes in (agreeing
    replicas set aside), ``stage`` wraps the contribution checks to settle disagreeing pairs, ``settle``
    gives each set-aside replica its twin's verdict."""

    updates: list[Update]
    agreed: list[_Pair] = dataclasses.field(default_factory=list)  # second is set aside
    disputed: list[_Pair] = dataclasses.field(default_factory=list)
    uncompared: list[tuple[int, int, str]] = dataclasses.field(default_factory=list)

    def stage(self, contributions: Callable | None) -> Callable | None:
        if not self.disputed:
            return contributions

        def run(ups: Sequence[Update], verdicts: list[Verdict]) -> None:
            if contributions is not None:
                contributions(ups, verdicts)
            _settle_disputes(self.disputed, ups, verdicts)

        return run

    def settle(self, verdicts: list[Verdict]) -> None:
        by_id = {v.id: v for v in verdicts}
        for first, second, reason in self.uncompared:
            for own, other in ((first, second), (second, first)):
                if own in by_id:
                    by_id[own].extra["replica"] = {"agreed": None, "cosine": None, "norm_rel": None, "reason": reason,
                                                   "other_task": other, "replica_task": second, "first_task": first}
        for pair in self.agreed:
            twin = by_id.get(pair.first)
            if twin is None:
                continue
            twin.extra["replica"] = _check_json(pair, pair.second, kept=None)
            verdicts.append(Verdict(
                pair.second, twin.accepted, twin.code, f"agrees with task {pair.first}: {twin.reason}"
                if twin.reason else "", twin.norm, twin.cosine, twin.score,
                extra={"sketch": twin.extra.get("sketch"), "replica": _check_json(pair, pair.first, kept=None)}))


def _check_json(pair: _Pair, other: int, *, kept: int | None) -> dict:
    out = {**pair.agreement.as_json(), "other_task": other, "replica_task": pair.second, "first_task": pair.first}
    if kept is not None:
        out["kept"] = kept
    return out


def replica_plan(tasks: Sequence[Task], updates: list[Update]) -> ReplicaPlan:
    """Pair each completed replica with its shard's other completed task and compare them."""
    plan = ReplicaPlan(updates=list(updates))
    by_id = {u.id: u for u in updates}
    by_shard: dict[int, list[Task]] = {}
    for t in tasks:
        by_shard.setdefault(t.shard_index, []).append(t)
    aside = set()
    for shard_tasks in by_shard.values():
        replicas = [t for t in shard_tasks if t.replica_of_id is not None]
        firsts = [t for t in shard_tasks if t.replica_of_id is None]
        if not replicas or not firsts:
            continue
        a, b = firsts[0], replicas[0]
        ua, ub = by_id.get(a.pk), by_id.get(b.pk)
        if ua is None or ub is None or ua.tensors is None or ub.tensors is None:
            plan.uncompared.append((a.pk, b.pk, "an update could not be read"))
            continue
        pair = _Pair(a.pk, b.pk, compare(ua.tensors, ub.tensors, tolerance=tolerance()))
        if pair.agreement.agreed:
            plan.agreed.append(pair)
            aside.add(b.pk)
        else:
            plan.disputed.append(pair)
    plan.updates = [u for u in updates if u.id not in aside]
    return plan


def _own_gain(v: Verdict) -> float | None:
    gain = (v.score or {}).get("own_gain")
    return float(gain) if isinstance(gain, int | float) and math.isfinite(gain) else None


def _settle_disputes(disputed: list[_Pair], ups: Sequence[Update], verdicts: list[Verdict]) -> None:
    """Keep the member of each disagreeing pair the round favours; turn the other away (before aggregation)."""
    by_id: dict[Hashable, tuple[Update, Verdict]] = {u.id: (u, v) for u, v in zip(ups, verdicts, strict=True)}
    paired = {p.first for p in disputed} | {p.second for p in disputed}
    others = [u.tensors for u, v in zip(ups, verdicts, strict=True) if v.accepted and u.id not in paired]
    centre = robust_centre(others)
    for pair in disputed:
        (ua, va), (ub, vb) = by_id[pair.first], by_id[pair.second]
        sides = [Side(u.id, v.accepted, _own_gain(v), centre_cosine(u.tensors, centre) if v.accepted else None)
                 for u, v in ((ua, va), (ub, vb))]
        if not va.accepted and not vb.accepted:  # both turned away already, each for its own reason
            va.extra["replica"] = _check_json(pair, pair.second, kept=None)
            vb.extra["replica"] = _check_json(pair, pair.first, kept=None)
            continue
        keep, why = favoured(*sides)
        loser, loser_v, winner_v = (pair.second, vb, va) if keep == pair.first else (pair.first, va, vb)
        winner_v.extra["replica"] = {**_check_json(pair, loser, kept=keep), "why": why}
        loser_v.extra["replica"] = {**_check_json(pair, keep, kept=keep), "why": why}
        if loser_v.accepted:
            loser_v.accepted, loser_v.code = False, REPLICA_MISMATCH
            loser_v.reason = (f"replica mismatch: disagrees with task {keep}, the same work done by another worker "
                              f"({pair.agreement.reason}); task {keep} was kept because {why}")


def replicas_record(*, run: TrainingRun, rnd: Round, verdicts: Sequence[Verdict], tasks: dict) -> None:
    """Keep each pair's comparison on its tasks and publish the round's spot checks (inside the aggregation's
    transaction)."""
    checks = {v.id: v.extra["replica"] for v in verdicts if v.extra.get("replica")}
    sampled = replica_shards(run, rnd.index)
    if not checks and not sampled:
        return
    pairs = {}
    for task_id, check in checks.items():
        task = tasks[task_id]
        task.replica_check = check
        task.save(update_fields=["replica_check"])
        pairs.setdefault(check["replica_task"], {"first_task": check["first_task"], "replica_task":
                                                 check["replica_task"], "shard": task.shard_index,
                                                 "agreed": check["agreed"], "cosine": check["cosine"],
                                                 "norm_rel": check["norm_rel"], "kept": check.get("kept")})
    # A replica nobody claimed is not a missing upload: no other worker with the same device came free to take
    # it (a worker holds one task per round, so with k equal to the workers taking part none ever does).
    unclaimed = list(Task.objects.filter(round=rnd, replica_of__isnull=False, worker__isnull=True,
                                         status=Task.Status.PENDING))
    for task in unclaimed:
        task.replica_check = {"agreed": None, "cosine": None, "norm_rel": None, "reason": REPLICA_UNCLAIMED,
                              "other_task": None, "first_task": task.replica_of_id, "replica_task": task.pk}
        pairs[task.pk] = {"first_task": task.replica_of_id, "replica_task": task.pk, "shard": task.shard_index,
                          "agreed": None, "cosine": None, "norm_rel": None, "kept": None, "reason": REPLICA_UNCLAIMED}
    Task.objects.bulk_update(unclaimed, ["replica_check"])
    for pair in pairs.values():
        if pair["agreed"] or pair["kept"] is None:
            continue
        loser = pair["replica_task"] if pair["kept"] == pair["first_task"] else pair["first_task"]
        task = tasks[loser]
        entry_append(actor=None, action="task.replica_mismatch", subject=run.ledger_subject,
                     payload={"run_id": run.pk, "round": rnd.index, "task_id": loser, "worker_id": task.worker_id,
                              "kept_task_id": pair["kept"], "cosine": pair["cosine"], "norm_rel": pair["norm_rel"],
                              "reason": task.reason})
    entry_append(actor=None, action="round.replicas", subject=run.ledger_subject,
                 payload={"run_id": run.pk, "round": rnd.index, "fraction": replica_fraction(run),
                          "sampled_shards": sampled, "pairs": sorted(pairs.values(), key=lambda p: p["shard"])})
