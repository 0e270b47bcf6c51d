"""Reads for training pages and the API. Each selector owns its joins so page queries stay constant."""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal

from django.db.models import Prefetch, QuerySet
from django.shortcuts import get_object_or_404

from training.models import Checkpoint, CommunityModel, Round, Task, TrainingRun


def home_summary() -> dict:
    return {"runs_active": TrainingRun.objects.filter(
        status__in=[TrainingRun.Status.PENDING, TrainingRun.Status.RUNNING]).count()}


def runs_list(*, status: str = "") -> QuerySet[TrainingRun]:
    qs = TrainingRun.objects.select_related("model", "proposal", "final_checkpoint").prefetch_related(
        Prefetch("rounds", queryset=Round.objects.order_by("index")))
    if status:
        qs = qs.filter(status=status)
    return qs.order_by("-created_at", "-id")


def run_get(*, pk: int) -> TrainingRun:
    # Sketches (a thousand floats each) are for the replay check, not for the page.
    tasks = Task.objects.select_related("worker", "worker__owner").defer("update_sketch").order_by("shard_index", "id")
    # Which shards are spot-checked stays secret until the round is aggregated (``training.services.replicas``).
    tasks = tasks.exclude(replica_of__isnull=False, round__status__in=[Round.Status.OPEN, Round.Status.AGGREGATING])
    rounds = Round.objects.order_by("index").defer("step_sketch").prefetch_related(Prefetch("tasks", queryset=tasks))
    qs = TrainingRun.objects.select_related(
        "model", "proposal", "proposal__author", "base_checkpoint", "final_checkpoint"
    ).prefetch_related(Prefetch("rounds", queryset=rounds))
    return get_object_or_404(qs, pk=pk)


def _finite(x) -> bool:
    """A number a float holds. Values come from JSON a worker sent: an int may be too large for a double
    (``math.isfinite(10**400)`` raises), a bool is not a number."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def _mean(values: list[float]) -> float:
    """The mean without overflow: ``statistics.fmean`` of two values near 1.7e308 raises ``OverflowError``
    ("intermediate overflow in fsum"); dividing first keeps every partial sum within the largest value."""
    n = len(values)
    try:
        return math.fsum(float(v) / n for v in values)
    except OverflowError:  # rounding at the very top of the double range
        return max(float(v) for v in values)


@dataclass
class LossPoint:
    round: int
    heldout: float | None
    train: float | None
    accepted: bool | None


def run_loss_points(run: TrainingRun) -> list[LossPoint]:
    """Held-out loss after each round (round 0: before the first) and mean worker train loss (loss_end)."""
    rounds = list(run.rounds.all())
    points: list[LossPoint] = []
    if rounds and _finite(rounds[0].eval_loss_before):
        points.append(LossPoint(0, rounds[0].eval_loss_before, None, None))
    for r in rounds:
        if r.aggregated_at is None:
            continue
        train = [t.metrics.get("loss_end") for t in r.tasks.all()
                 if t.status in (Task.Status.ACCEPTED, Task.Status.REJECTED, Task.Status.COMPLETED)]
        train = [x for x in train if _finite(x)]
        heldout = r.eval_loss_after if r.accepted else r.eval_loss_before
        points.append(LossPoint(r.index, heldout if _finite(heldout) else None,
                                _mean(train) if train else None, r.accepted))
    return points


@dataclass
class Contributor:
    worker_id: int
    name: str
    owner: str
    accepted: int = 0
    rejected: int = 0
    other: int = 0
    credits: Decimal = Decimal(0)
    reliability: float = 0.0
    compute_s: float = 0.0  # from the tasks' metrics (agents that report utilisation and traffic)
    wall_s: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0

    @property
    def utilisation(self) -> float | None:
        """Compute seconds over wall seconds across this worker's reported rounds; None when none reported."""
        return self.compute_s / self.wall_s if self.wall_s > 0 else None


def run_contributors(run: TrainingRun) -> list[Contributor]:
    """Per worker: accepted and rejected updates and credits earned in this run (from prefetched tasks)."""
    out: dict[int, Contributor] = {}
    for r in run.rounds.all():
        for t in r.tasks.all():
            if t.worker_id is None:
                continue
            c = out.get(t.worker_id)
            if c is None:
                c = out[t.worker_id] = Contributor(t.worker_id, t.worker.name, t.worker.owner.get_username(),
                                                   reliability=t.worker.reliability)
            m = t.metrics if isinstance(t.metrics, dict) else {}
            if isinstance(m.get("wall_seconds"), int | float) and isinstance(m.get("compute_seconds"), int | float):
                c.compute_s += float(m["compute_seconds"])
                c.wall_s += float(m["wall_seconds"])
            c.bytes_sent += int(m.get("bytes_sent") or 0)
            c.bytes_received += int(m.get("bytes_received") or 0)
            if t.status == Task.Status.ACCEPTED:
                c.accepted += 1
                c.credits += t.credit or 0
            elif t.status == Task.Status.REJECTED:
                c.rejected += 1
            else:
                c.other += 1
    return sorted(out.values(), key=lambda c: (-c.credits, -c.accepted, c.worker_id))


def run_current_round(run: TrainingRun) -> Round | None:
    rounds = list(run.rounds.all())
    return rounds[-1] if rounds else None


def run_ledger(run: TrainingRun, *, limit: int = 100):
    from ledger.selectors import entries_for_subjects

    return entries_for_subjects(subjects=[run.ledger_subject, f"proposal:{run.proposal_id}"], limit=limit)


def models_list() -> QuerySet[CommunityModel]:
    return CommunityModel.objects.select_related("current_checkpoint").order_by("slug")


def model_get(*, slug: str) -> CommunityModel:
    return get_object_or_404(CommunityModel.objects.select_related("current_checkpoint"), slug=slug)


def model_checkpoints(model: CommunityModel) -> QuerySet[Checkpoint]:
    return Checkpoint.objects.filter(model=model).select_related("run", "round").order_by("-created_at")


def model_runs(model: CommunityModel) -> QuerySet[TrainingRun]:
    return TrainingRun.objects.filter(model=model).select_related("proposal").order_by("-created_at")


def playground_models() -> list[CommunityModel]:
    """Models with at least one version to sample."""
    return list(models_list().filter(versions__isnull=False).distinct())


def checkpoint_get(*, sha256: str) -> Checkpoint | None:
    return Checkpoint.objects.filter(sha256=sha256).first()


def model_versions(model: CommunityModel) -> list:
    """The model's versions, newest first, with what the version list shows."""
    from training.models import ModelVersion

    return list(ModelVersion.objects.filter(model=model).select_related(
        "run", "round", "parent", "lora_base", "checkpoint").order_by("-number"))


def version_get(*, model: CommunityModel, number: int | None = None):
    """Version ``number`` of the model, or its latest version when ``number`` is None (None if it has none)."""
    from training.models import ModelVersion

    qs = ModelVersion.objects.filter(model=model).select_related("model", "checkpoint", "run", "round", "lora_base")
    if number is None:
        return qs.order_by("-number").first()
    return qs.filter(number=number).first()


def version_for_export(*, slug: str, number: int):
    from training.models import ModelVersion

    qs = ModelVersion.objects.select_related("model", "checkpoint", "run", "run__proposal", "round", "parent",
                                             "lora_base")
    return get_object_or_404(qs, model__slug=slug, number=number)
