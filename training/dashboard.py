"""Selectors for a run's dashboard: tokens, throughput, ETA, loss against tokens, per-worker speed, samples
of generated text per round, the summary of a finished run, and runs side by side.

All numbers come from what is stored: the tasks' metrics (tokens, seconds, tokens/s as the agents reported
them and the server bounded), the rounds' times and held-out losses, and the model versions.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from dataclasses import dataclass, field
from datetime import timedelta

from django.conf import settings
from django.core.cache import cache
from django.core.paginator import Paginator

from training.models import ModelVersion, Round, Task, TrainingRun

SAMPLE_PROMPT_DEFAULT = "The "
SAMPLE_TOKENS = 48
COUNTED = (Task.Status.ACCEPTED, Task.Status.REJECTED, Task.Status.COMPLETED)


def _num(value) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) and x >= 0 else None


@dataclass
class WorkerSpeed:
    worker_id: int
    name: str
    tasks: int = 0
    tokens: int = 0
    seconds: float = 0.0
    rates: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float | None:
        if self.rates:
            return statistics.median(self.rates)
        return self.tokens / self.seconds if self.seconds > 0 else None


@dataclass
class TokenPoint:
    round: int
    tokens: int
    heldout: float | None
    accepted: bool | None


@dataclass
class Dashboard:
    tokens: int
    tokens_per_s: float | None  # the pool's: tokens of a round over that round's wall time, median over rounds
    median_round_s: float | None
    eta: timedelta | None
    rounds_left: int
    workers: list[WorkerSpeed]
    points: list[TokenPoint]
    summary: dict | None


def _task_tokens(task: Task) -> int:
    tokens = _num((task.metrics or {}).get("tokens"))
    return int(tokens) if tokens is not None else 0


def run_dashboard(run: TrainingRun, rounds: list[Round] | None = None) -> Dashboard:
    rounds = rounds if rounds is not None else list(run.rounds.prefetch_related("tasks__worker"))
    workers: dict[int, WorkerSpeed] = {}
    points: list[TokenPoint] = []
    durations, pool_rates = [], []
    total = 0
    if rounds and _num(rounds[0].eval_loss_before) is not None:
        points.append(TokenPoint(0, 0, rounds[0].eval_loss_before, None))
    for rnd in rounds:
        round_tokens = 0
        for task in rnd.tasks.all():
            if task.status not in COUNTED or task.worker_id is None:
                continue
            tokens = _task_tokens(task)
            round_tokens += tokens
            speed = workers.setdefault(task.worker_id, WorkerSpeed(task.worker_id, task.worker.name))
            speed.tasks += 1
            speed.tokens += tokens
            metrics = task.metrics or {}
            seconds = _num(metrics.get("seconds"))
            if seconds:
                speed.seconds += seconds
            rate = _num(metrics.get("tokens_per_s"))
            if rate:
                speed.rates.append(rate)
        total += round_tokens
        if rnd.aggregated_at and rnd.opened_at:
            wall = (rnd.aggregated_at - rnd.opened_at).total_seconds()
            if wall > 0:
                durations.append(wall)
                if round_tokens:
                    pool_rates.append(round_tokens / wall)
            heldout = rnd.eval_loss_after if rnd.accepted else rnd.eval_loss_before
            points.append(TokenPoint(rnd.index, total, heldout if _num(heldout) is not None else None, rnd.accepted))
    done = sum(1 for r in rounds if r.aggregated_at and r.status in (Round.Status.DONE, Round.Status.REJECTED))
    rounds_left = max(0, run.total_rounds - done) if run.is_active else 0
    median_round = statistics.median(durations) if durations else None
    eta = timedelta(seconds=round(median_round * rounds_left)) if median_round and rounds_left else None
    dash = Dashboard(
        tokens=total, tokens_per_s=statistics.median(pool_rates) if pool_rates else None,
        median_round_s=median_round, eta=eta, rounds_left=rounds_left,
        workers=sorted(workers.values(), key=lambda w: -(w.tokens_per_s or 0)), points=points, summary=None)
    if not run.is_active:
        dash.summary = _summary(run, rounds, dash)
    return dash


def _summary(run: TrainingRun, rounds: list[Round], dash: Dashboard) -> dict:
    heldout = [p.heldout for p in dash.points if p.heldout is not None]
    first, last = (heldout[0], heldout[-1]) if heldout else (None, None)
    accepted = sum(1 for r in rounds if r.accepted)
    # The rounds' tasks are already loaded (prefetched with the rounds); no second query over every task.
    credits = sum((t.credit for rnd in rounds for t in rnd.tasks.all() if t.credit is not None), start=0)
    final_version = (ModelVersion.objects.filter(run=run).select_related("model").order_by("-number").first())
    wall = (run.finished_at - run.created_at) if run.finished_at else None
    return {
        "status": run.status,
        "loss_first": first, "loss_last": last,
        "loss_change_pct": (100.0 * (last - first) / first) if first and last is not None else None,
        "rounds_accepted": accepted, "rounds_rejected": sum(1 for r in rounds if r.accepted is False),
        "tokens": dash.tokens, "wall": wall,
        "contributors": len(dash.workers), "credits": credits,
        "final_version": final_version,
    }


def run_ledger_page(run: TrainingRun, page: str | int | None, per_page: int = 20):
    """The run's and its proposal's ledger entries, newest first, a page at a time."""
    from ledger.models import Entry

    entries = Entry.objects.filter(subject__in=[run.ledger_subject, f"proposal:{run.proposal_id}"]).order_by("-seq")
    return Paginator(entries, per_page).get_page(page)


def sample_prompt() -> str:
    return getattr(settings, "AGORA_SAMPLE_PROMPT", SAMPLE_PROMPT_DEFAULT)


def round_version(run: TrainingRun, index: int) -> ModelVersion | None:
    return (ModelVersion.objects.filter(run=run, round__index=index).select_related("model", "checkpoint")
            .order_by("-number").first())


def round_sample(run: TrainingRun, index: int) -> dict | None:
    """A short sample of the version an accepted round published, with a fixed prompt and seed, so every
    round's text is comparable; generated once per checkpoint and cached. ``None`` when the round
    published no version (rejected, or not aggregated yet)."""
    from training.playground import sample_generate

    version = round_version(run, index)
    if version is None:
        return None
    prompt = sample_prompt()
    # The prompt is hashed: a cache key must be short and hold no spaces or control characters.
    digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]
    key = f"run-sample:v2:{version.checkpoint_id}:{SAMPLE_TOKENS}:{digest}"
    cached = cache.get(key)
    if cached is not None:
        return cached
    sample = sample_generate(version=version, prompt=prompt, max_new_tokens=SAMPLE_TOKENS, temperature=0.8,
                             top_k=40, seed=index)
    result = {"round": index, "version": version.number, "prompt": prompt, "text": sample.text,
              "withheld": bool(sample.blocked_by) or bool(sample.problem)}
    cache.set(key, result, timeout=7 * 24 * 3600)
    return result


def runs_compare(ids: list[int]) -> list[tuple[TrainingRun, Dashboard]]:
    runs = TrainingRun.objects.filter(pk__in=ids).select_related("model", "proposal")
    by_id = {r.pk: r for r in runs}
    return [(by_id[i], run_dashboard(by_id[i])) for i in ids if i in by_id]
