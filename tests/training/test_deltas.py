"""Published steps: a sparse run's accepted round publishes the step that rebuilds its checkpoint; the next
task and the ledger name it; the delta endpoint serves it. Results carry utilisation and traffic, and an
update measured from another checkpoint is refused."""

import json

import pytest
import torch
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from diloco.checkpoint import save_weights, sha256_hex
from diloco.codecs import reference_of
from diloco.outer import round_int8_pow2
from diloco.sparse import apply_published_delta, decode_published_delta, published_meta
from ledger.models import Entry
from tests.marketplace.factories import WorkerFactory
from training import blobs, services
from training.models import Round, Task

from .conftest import client_for
from .factories import approved_proposal, metrics_json, task_json, train_update

pytestmark = pytest.mark.django_db


def _run(compression: str):
    run = services.run_start(proposal_id=approved_proposal(diloco={
        "workers_per_round": 1, "rounds": 3, "outer_momentum": 0.0, "aggregator": "mean"}).pk)
    # The run's frozen spec as a proposal for a sparse codec freezes it.
    run.spec["diloco"]["compression"] = compression
    run.save(update_fields=["spec"])
    return run



def _train_round(run, worker):
    task = services.task_claim(worker=worker)
    body = task_json(task)
    data, metrics = train_update(body)
    services.task_submit_result(task_id=task.pk, worker=worker, data=data, metrics=metrics)
    return services.round_aggregate(round_id=task.round_id), body


def test_an_accepted_sparse_round_publishes_the_step_that_rebuilds_its_checkpoint():
    run = _run("topk2")
    worker = WorkerFactory(gpus=[])
    first, body = _train_round(run, worker)
    assert body["delta_from_sha256"] is None and body["delta_sha256"] is None  # the base checkpoint has none
    assert first is not None and first.accepted

    # The ledger names the new checkpoint, the checkpoint it came from and the step between them.
    entry = Entry.objects.get(action="round.aggregated")
    assert entry.payload["checkpoint_sha256"] == first.checkpoint_out_id
    assert entry.payload["delta_from_sha256"] == first.checkpoint_in_id
    step_sha = entry.payload["delta_sha256"]
    assert len(step_sha) == 64
    # Every update's hash and codec are in the ledger.
    completed = Entry.objects.get(action="task.completed")
    assert completed.payload["codec"] == "topk2" and len(completed.payload["update_sha256"]) == 64

    # The next task tells the agent which step to download instead of the checkpoint.
    nxt = services.task_claim(worker=worker)
    payload = task_json(nxt)
    assert payload["checkpoint_sha256"] == first.checkpoint_out_id
    assert payload["delta_from_sha256"] == first.checkpoint_in_id and payload["delta_sha256"] == step_sha

    response = APIClient().get(f"/api/v1/checkpoints/{first.checkpoint_out_id}/delta")
    assert response.status_code == 200
    step = b"".join(response.streaming_content)
    assert sha256_hex(step) == step_sha
    assert len(step) < first.checkpoint_out.size / 10  # a sparse step, not a checkpoint
    meta = published_meta(step)
    state_in, _ = blobs.checkpoint_state(first.checkpoint_in_id)
    rebuilt = save_weights(apply_published_delta(state_in, step), meta["checkpoint_meta"])
    assert sha256_hex(rebuilt) == first.checkpoint_out_id

    # The step was rounded per chunk to int8 times a power of two (rounding it again changes nothing; a
    # float16 step would change), and what the rounding left out waits in the run's outer state.
    d = decode_published_delta(step, reference_of(state_in))
    assert all(torch.equal(round_int8_pow2(t), t) for t in d.values())
    assert any(not torch.equal(round_int8_pow2(t * 1.001), t * 1.001) for t in d.values() if t.any())
    run.refresh_from_db()
    residuals = {k for k in blobs.outer_state(run.outer_state_name) if k.startswith("residual.")}
    assert residuals == {f"residual.{k}" for k in state_in}


def test_a_dense_run_publishes_no_step_and_the_endpoint_says_so():
    run = _run("int8")
    worker = WorkerFactory(gpus=[])
    first, _ = _train_round(run, worker)
    assert first.accepted
    assert Entry.objects.get(action="round.aggregated").payload["delta_sha256"] is None
    assert task_json(services.task_claim(worker=worker))["delta_sha256"] is None
    assert APIClient().get(f"/api/v1/checkpoints/{first.checkpoint_out_id}/delta").status_code == 404
    assert APIClient().get(f"/api/v1/checkpoints/{'f' * 64}/delta").status_code == 404


def _upload(worker, task_id, data: bytes, metrics: str):
    body = {"update": SimpleUploadedFile("update.safetensors", data), "metrics": metrics}
    return client_for(worker).post(f"/api/v1/tasks/{task_id}/result", body, format="multipart")


LINK = {"compute_seconds": 9.5, "wall_seconds": 10.0, "utilisation": 0.95, "bytes_sent": 1234,
        "bytes_received": 56789, "checkpoint_via": "delta", "overlap_steps": 2, "overlap_from_round": 0}


def test_results_keep_utilisation_and_traffic_and_the_run_page_shows_them():
    run = _run("int8")
    worker = WorkerFactory(gpus=[])
    task = services.task_claim(worker=worker)
    data, _ = train_update(task_json(task))
    response = _upload(worker, task.pk, data, metrics_json(base_checkpoint_sha256=task.round.checkpoint_in_id,
                                                           **LINK))
    assert response.status_code == 202, response.json()
    task.refresh_from_db()
    assert {k: task.metrics[k] for k in LINK} == LINK

    page = APIClient().get(f"/runs/{run.pk}/").content.decode()
    assert "Utilisation" in page and "95%" in page
    detail = APIClient().get(f"/api/v1/runs/{run.pk}/").json()
    assert detail["contributors"][0]["utilisation"] == pytest.approx(0.95)
    assert detail["contributors"][0]["bytes_received"] == 56789


@pytest.mark.parametrize("bad", [
    {"utilisation": 1.5}, {"bytes_sent": -1}, {"bytes_received": 1.5}, {"wall_seconds": -2},
    {"checkpoint_via": "carrier-pigeon"}, {"base_checkpoint_sha256": "xyz"},
])
def test_out_of_bounds_link_metrics_are_refused_naming_the_field(bad):
    run = _run("int8")
    worker = WorkerFactory(gpus=[])
    task = services.task_claim(worker=worker)
    response = _upload(worker, task.pk, b"not even looked at", metrics_json(**bad))
    assert response.status_code == 400
    assert next(iter(bad)) in json.dumps(response.json())
    assert Task.objects.get(pk=task.pk).status == Task.Status.ASSIGNED
    assert run.pk


def test_an_update_measured_from_another_checkpoint_is_refused():
    run = _run("int8")
    worker = WorkerFactory(gpus=[])
    task = services.task_claim(worker=worker)
    data, _ = train_update(task_json(task))
    response = _upload(worker, task.pk, data, metrics_json(base_checkpoint_sha256="a" * 64))
    assert response.status_code == 400
    assert response.json()["error"] == "stale_base" and "base_checkpoint_sha256" in response.json()["detail"]
    assert Task.objects.get(pk=task.pk).status == Task.Status.ASSIGNED
    assert not Entry.objects.filter(action="task.completed").exists()
    assert Round.objects.get(run=run, index=1).status == Round.Status.OPEN
