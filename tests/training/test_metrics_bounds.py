"""Worker metrics are finite, bounded and integral where they count things; whatever is already stored,
the run page and the run API still answer."""

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone

from ledger.models import Entry
from ledger.selectors import ledger_verify
from training import blobs, services
from training.models import Round, Task

from .conftest import client_for
from .factories import METRICS, approved_proposal, random_update

pytestmark = pytest.mark.django_db


@pytest.fixture
def run():
    return services.run_start(proposal_id=approved_proposal().pk)


@pytest.fixture
def claimed(run, cpu_worker):
    body = client_for(cpu_worker).post("/api/v1/tasks/claim").json()
    return Task.objects.get(pk=body["id"])


@pytest.fixture
def update(run):
    return random_update(blobs.checkpoint_state(run.base_checkpoint_id)[0], scale=1e-3)


def _upload(worker, task, data: bytes, metrics_text: str):
    body = {"update": SimpleUploadedFile("update.safetensors", data), "metrics": metrics_text}
    return client_for(worker).post(f"/api/v1/tasks/{task.pk}/result", body, format="multipart")


def _metrics_text(**raw: str) -> str:
    """Metrics as JSON text with some values spelled exactly as given (``1.7e308``, ``NaN``, ``true``)."""
    values = {key: repr(value) for key, value in METRICS.items()} | raw
    return "{" + ",".join(f'"{key}":{text}' for key, text in values.items()) + "}"


@pytest.mark.parametrize(("field", "text"), [
    ("loss_end", "1.7e308"),        # the value that broke the ledger on PostgreSQL
    ("loss_end", "1e16"),
    ("loss_end", "1000000.5"),      # just above the bound
    ("loss_end", "1e400"),          # overflows a double
    ("loss_end", "NaN"),
    ("loss_start", "-Infinity"),
    ("loss_start", "-0.5"),
    ("loss_start", '"lots"'),
    ("loss_start", "true"),
    ("steps", "1.5"),
    ("steps", "true"),
    ("steps", "-1"),
    ("steps", "1000000001"),
    ("steps", "1e300"),
    ("tokens", "1000000000000001"),
    ("tokens", "123456789012345678901234567890"),
    ("seconds", "10000001"),
    ("seconds", "-1"),
    ("seconds", "null"),
])
def test_out_of_bounds_metric_is_a_400_naming_it_and_nothing_is_stored(claimed, cpu_worker, update, field, text):
    entries_before = Entry.objects.count()
    response = _upload(cpu_worker, claimed, update, _metrics_text(**{field: text}))

    assert response.status_code == 400, response.content
    body = response.json()
    assert f"metrics.{field}" in body.get("fields", {}) or body["detail"].startswith(f"metrics.{field}"), body
    fresh = Task.objects.get(pk=claimed.pk)
    assert fresh.status == Task.Status.ASSIGNED and fresh.metrics == {} and fresh.update_sha256 == ""
    assert Entry.objects.count() == entries_before


def test_missing_metric_is_named(claimed, cpu_worker, update):
    text = '{"loss_start": 5.5, "steps": 3, "tokens": 384, "seconds": 0.5}'
    response = _upload(cpu_worker, claimed, update, text)
    assert response.status_code == 400 and "metrics.loss_end" in response.json()["fields"]


def test_values_at_the_bounds_are_accepted_and_the_ledger_keeps_them_exactly(claimed, cpu_worker, update):
    # -0.0, a subnormal and integral floats are exactly the values jsonb used to rewrite.
    text = _metrics_text(loss_start="-0.0", loss_end="5e-324", steps="1000000000", tokens="1000000000000000",
                         seconds="10000000.0")
    response = _upload(cpu_worker, claimed, update, text)

    assert response.status_code == 202, response.content
    entry = Entry.objects.get(action="task.completed")
    metrics = entry.payload["metrics"]
    assert str(metrics["loss_start"]) == "-0.0" and metrics["loss_end"] == 5e-324
    assert metrics["steps"] == 10**9 and isinstance(metrics["steps"], int)
    assert metrics["tokens"] == 10**15 and isinstance(metrics["seconds"], float)
    verdict = ledger_verify()
    assert verdict.ok, str(verdict)


def test_integral_float_counts_are_accepted_as_integers(claimed, cpu_worker, update):
    response = _upload(cpu_worker, claimed, update, _metrics_text(steps="3.0", tokens="384.0"))
    assert response.status_code == 202, response.content
    task = Task.objects.get(pk=claimed.pk)
    assert task.metrics["steps"] == 3 and isinstance(task.metrics["steps"], int)


def test_run_page_and_api_answer_whatever_metrics_are_stored(client, api_client, run, cpu_worker, gpu_worker):
    """Rows written before the bounds existed (or by hand) must not take the run page down."""
    rnd = Round.objects.get(run=run, index=1)
    tasks = [services.task_claim(worker=w) for w in (cpu_worker, gpu_worker)]
    assert all(tasks)
    hostile = [{"loss_end": 1.7e308}, {"loss_end": 1.7e308}]  # their sum overflows: fsum's OverflowError
    for task, metrics in zip(tasks, hostile, strict=True):
        Task.objects.filter(pk=task.pk).update(status=Task.Status.ACCEPTED, metrics=metrics, update_sha256="a" * 64)
    Round.objects.filter(pk=rnd.pk).update(aggregated_at=timezone.now(), accepted=True, eval_loss_before=1.7e308,
                                           eval_loss_after=5.0, status=Round.Status.DONE,
                                           checkpoint_out_id=rnd.checkpoint_in_id)

    page = client.get(f"/runs/{run.pk}/")
    assert page.status_code == 200
    assert "<svg" in page.content.decode()
    api = api_client.get(f"/api/v1/runs/{run.pk}/")
    assert api.status_code == 200, api.content
    losses = api.json()["losses"]
    assert losses[1]["round"] == 1 and losses[1]["train"] == pytest.approx(1.7e308)

    # Values that are not numbers a float can hold are left out rather than failing the page.
    for task, metrics in zip(tasks, [{"loss_end": 10**400}, {"loss_end": True}], strict=True):
        Task.objects.filter(pk=task.pk).update(metrics=metrics)
    assert client.get(f"/runs/{run.pk}/").status_code == 200
    api = api_client.get(f"/api/v1/runs/{run.pk}/")
    assert api.status_code == 200 and api.json()["losses"][1]["train"] is None


def test_loss_chart_draws_extreme_values():
    from training.charts import loss_chart_svg
    from training.selectors import LossPoint

    points = [LossPoint(0, 1.7e308, None, None), LossPoint(1, 0.0, 1.79e308, True), LossPoint(2, 5e-324, 2.0, False)]
    svg = loss_chart_svg(points)
    assert svg.startswith("<svg") and "nan" not in svg and "inf" not in svg


def test_run_api_renders_non_finite_stored_floats_as_null(client, api_client, run, cpu_worker):
    """A diverged evaluation stores NaN or infinity in a float column; JSON cannot spell either."""
    from training.models import Checkpoint

    rnd = Round.objects.get(run=run, index=1)
    task = services.task_claim(worker=cpu_worker)
    Task.objects.filter(pk=task.pk).update(update_norm=float("nan"), metrics={"loss_end": 3.0},
                                           status=Task.Status.REJECTED, update_sha256="a" * 64)
    Round.objects.filter(pk=rnd.pk).update(aggregated_at=timezone.now(), accepted=False, eval_loss_before=float("nan"),
                                           eval_loss_after=float("-inf"), status=Round.Status.REJECTED,
                                           checkpoint_out_id=rnd.checkpoint_in_id)
    Checkpoint.objects.filter(pk=rnd.checkpoint_in_id).update(eval_loss=float("inf"))

    assert client.get(f"/runs/{run.pk}/").status_code == 200
    response = api_client.get(f"/api/v1/runs/{run.pk}/")
    assert response.status_code == 200, response.content
    body = response.json()
    first = body["rounds"][0]
    assert first["eval_loss_before"] is None and first["eval_loss_after"] is None
    assert first["tasks"][0]["update_norm"] is None and body["base_checkpoint"]["eval_loss"] is None
    assert body["losses"][-1]["train"] == 3.0
