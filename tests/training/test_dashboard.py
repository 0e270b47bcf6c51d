"""The run page as a training dashboard: tokens, throughput, ETA, loss against tokens, per-worker speed,
samples per round, a finished run's summary, paginated ledger entries, and runs compared."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
from django.utils import timezone

from ledger.services import entry_append
from tests.training.factories import approved_proposal
from training.charts import nice_ticks
from training.dashboard import run_dashboard
from training.models import Round, Task, TrainingRun
from training.services import run_start, task_claim

pytestmark = pytest.mark.django_db


@pytest.fixture
def run():
    return run_start(proposal_id=approved_proposal(diloco={"rounds": 4}).pk)


def _finish_round(rnd: Round, worker, *, tokens: int, seconds: float, loss_before: float, loss_after: float,
                  wall_s: float):
    task = task_claim(worker=worker)
    assert task is not None and task.round_id == rnd.pk
    Task.objects.filter(pk=task.pk).update(
        status=Task.Status.ACCEPTED, update_sha256="a" * 64, update_name="u", update_size=1, metrics={"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                                              "loss_start": 5.0, "loss_end": 4.0})
    opened = timezone.now() - timedelta(seconds=wall_s)
    Round.objects.filter(pk=rnd.pk).update(
        opened_at=opened, aggregated_at=timezone.now(), status=Round.Status.DONE, accepted=True,
        checkpoint_out_id=rnd.checkpoint_in_id,
        eval_loss_before=loss_before, eval_loss_after=loss_after)


def test_dashboard_counts_tokens_throughput_and_eta(run, cpu_worker):
    rnd = Round.objects.get(run=run, index=1)
    _finish_round(rnd, cpu_worker, tokens=4096, seconds=2.0, loss_before=5.5, loss_after=5.0, wall_s=8.0)
    dash = run_dashboard(TrainingRun.objects.get(pk=run.pk))
    assert dash.tokens == 4096
    assert dash.tokens_per_s == pytest.approx(4096 / 8.0, rel=0.05)
    assert dash.median_round_s == pytest.approx(8.0, rel=0.05)
    assert dash.rounds_left == 3
    assert dash.eta.total_seconds() == pytest.approx(24.0, rel=0.05)
    assert [(p.round, p.tokens) for p in dash.points] == [(0, 0), (1, 4096)]
    assert dash.points[1].heldout == 5.0
    [speed] = dash.workers
    assert speed.worker_id == cpu_worker.pk and speed.tokens_per_s == pytest.approx(2048.0)
    assert dash.summary is None


def test_run_page_shows_dashboard_and_finished_summary(client, run, cpu_worker):
    rnd = Round.objects.get(run=run, index=1)
    _finish_round(rnd, cpu_worker, tokens=1000, seconds=1.0, loss_before=5.5, loss_after=4.4, wall_s=5.0)
    html = client.get(f"/runs/{run.pk}/").content.decode()
    assert "1,000</strong>tokens trained" in html
    assert "loss against tokens" in html and "tokens trained</text>" in html
    assert "to go (3 rounds left)" in html
    assert f'hx-get="/runs/{run.pk}/samples/1"' in html
    assert "Summary" not in html

    TrainingRun.objects.filter(pk=run.pk).update(status=TrainingRun.Status.FINISHED, finished_at=timezone.now(),
                                                 final_checkpoint_id=rnd.checkpoint_in_id)
    html = client.get(f"/runs/{run.pk}/").content.decode()
    assert "Summary" in html and "5.5000 → 4.4000 (-20.0%)" in html
    assert "1 round accepted" in html and "1 worker contributed" in html


def test_ledger_entries_come_a_page_at_a_time(client, run):
    for i in range(45):
        entry_append(actor="system", action="round.note", subject=run.ledger_subject, payload={"i": i})
    html = client.get(f"/runs/{run.pk}/").content.decode()
    assert html.count("<code>round.note</code>") == 20
    assert "page 1 of" in html and "?ledger_page=2#run-ledger" in html
    older = client.get(f"/runs/{run.pk}/ledger?page=3").content.decode()
    assert "page 3 of" in older and older.count("<tr>") <= 21


def test_round_sample_of_a_round_without_version(client, run):
    response = client.get(f"/runs/{run.pk}/samples/1")
    assert response.status_code == 200
    assert "published no version" in response.content.decode()


def test_compare_runs_page(client, run):
    other = run_start(proposal_id=approved_proposal(model={"name": "tiny-two"}).pk)
    html = client.get(f"/runs/compare/?runs={run.pk},{other.pk}").content.decode()
    assert f'href="/runs/{run.pk}/"' in html and f'href="/runs/{other.pk}/"' in html
    bad = client.get("/runs/compare/?runs=1;drop")
    assert bad.status_code == 400 and "runs: give run numbers" in bad.content.decode()
    missing = client.get(f"/runs/compare/?runs={run.pk},999999").content.decode()
    assert "no run 999999" in missing
    too_many = client.get("/runs/compare/?runs=1,2,3,4,5,6,7")
    assert too_many.status_code == 400


@pytest.mark.parametrize(("lo", "hi"), [(2.31, 5.77), (0.0, 1.0), (1e-4, 3e-4), (100, 1e6), (4.999, 5.001)])
def test_chart_ticks_are_round_numbers(lo, hi):
    ticks = nice_ticks(lo, hi)
    assert ticks[0] <= lo + 1e-12 and ticks[-1] >= hi - 1e-12
    steps = {round(b - a, 12) for a, b in zip(ticks, ticks[1:], strict=False)}
    assert len(steps) == 1
    step = steps.pop()
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert round(mantissa, 6) in (1.0, 2.0, 5.0)
