"""Every way an upload can be wrong gets a 4xx naming the problem, and nothing is stored."""

import json

import pytest
import torch
from django.core.files.uploadedfile import SimpleUploadedFile
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from diloco.codecs import encode_update
from ledger.models import Entry
from training import blobs, services
from training.models import Task

from .conftest import client_for, stored_files
from .factories import approved_proposal, metrics_json, random_update, train_update

pytestmark = pytest.mark.django_db


@pytest.fixture
def run():
    return services.run_start(proposal_id=approved_proposal().pk)


@pytest.fixture
def claimed(run, cpu_worker):
    body = client_for(cpu_worker).post("/api/v1/tasks/claim").json()
    return Task.objects.get(pk=body["id"]), body


@pytest.fixture
def state(run):
    return blobs.checkpoint_state(run.base_checkpoint_id)[0]


def upload(worker, task_id, data: bytes, metrics: str | None = None):
    body = {"update": SimpleUploadedFile("update.safetensors", data)}
    if metrics is not None:
        body["metrics"] = metrics
    return client_for(worker).post(f"/api/v1/tasks/{task_id}/result", body, format="multipart")


def test_honest_upload_is_accepted_and_stored(claimed, cpu_worker, checkpoint_storage):
    task, body = claimed
    data, metrics = train_update(body)
    response = upload(cpu_worker, task.pk, data, metrics_json(**metrics))

    assert response.status_code == 202, response.json()
    assert response.json()["accepted_for_aggregation"] is True
    task.refresh_from_db()
    assert task.status == Task.Status.COMPLETED and task.update_size == len(data)
    assert task.metrics["loss_end"] == pytest.approx(metrics["loss_end"])
    assert blobs.blob_read(task.update_name) == data
    assert Entry.objects.filter(action="task.completed").count() == 1


def _assert_nothing_stored(task, before_files, root):
    fresh = Task.objects.get(pk=task.pk)
    assert fresh.status == task.status and fresh.update_sha256 == "" and fresh.metrics == {}
    assert stored_files(root) == before_files
    assert not Entry.objects.filter(action="task.completed").exists()


def _raw_metadata(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]).get("__metadata__", {})


def reencode(data: bytes, mutate) -> bytes:
    """Change the tensors of a valid encoded update, keeping its metadata (whatever its format)."""
    tensors = st_load(data)
    mutate(tensors)
    return st_save(tensors, metadata=_raw_metadata(data))


def _bad_cases(state):
    names = list(state)
    first, last = names[0], names[-1]
    zeros = {k: torch.zeros(v.shape) for k, v in state.items()}
    good = encode_update(zeros, "int8")

    def nan_scale(t):
        t[first + "::scale"] = torch.full_like(t[first + "::scale"], float("nan"))

    def wrong_shape(t):
        t[first] = torch.zeros(3, 3, dtype=torch.int8)

    def missing(t):
        del t[last]

    def extra(t):
        t["evil.weight"] = torch.zeros(2, dtype=torch.int8)

    def wrong_dtype(t):
        t[first] = t[first].to(torch.int16)

    return [
        ("not_safetensors", b"this is not a safetensors file at all" * 10, None),
        ("not_safetensors", b"\xff" * 64, None),
        ("non_finite", reencode(good, nan_scale), first),
        ("tensor_mismatch", reencode(good, wrong_shape), first),
        ("tensor_mismatch", reencode(good, missing), last),
        ("tensor_mismatch", reencode(good, extra), "evil.weight"),
        ("tensor_mismatch", reencode(good, wrong_dtype), first),
    ]


def test_bad_updates_are_rejected_naming_the_problem(claimed, cpu_worker, state, checkpoint_storage):
    task, _ = claimed
    before = stored_files(checkpoint_storage)
    for code, data, named in _bad_cases(state):
        response = upload(cpu_worker, task.pk, data, metrics_json())
        assert response.status_code == 400, (code, response.content)
        assert response.json()["error"] == code, (code, response.json())
        if named:
            assert named in response.json()["detail"]
        _assert_nothing_stored(task, before, checkpoint_storage)


def test_nan_in_fp32_update_is_non_finite(cpu_worker, checkpoint_storage):
    run = services.run_start(proposal_id=approved_proposal(model={"name": "fp32-model"},
                                                           diloco={"compression": "fp32"}).pk)
    state = blobs.checkpoint_state(run.base_checkpoint_id)[0]
    task = Task.objects.get(pk=client_for(cpu_worker).post("/api/v1/tasks/claim").json()["id"])
    name = next(iter(state))

    def poison(t):
        t[name].view(-1)[3] = float("nan")

    data = reencode(encode_update({k: torch.zeros(v.shape) for k, v in state.items()}, "fp32"), poison)
    before = stored_files(checkpoint_storage)
    response = upload(cpu_worker, task.pk, data, metrics_json())
    assert response.status_code == 400 and response.json()["error"] == "non_finite"
    assert name in response.json()["detail"]
    _assert_nothing_stored(task, before, checkpoint_storage)


@pytest.mark.parametrize("metrics, field", [
    (None, "metrics"),
    ("{not json", "metrics"),
    ("[1, 2]", "metrics"),
    (metrics_json(loss_end="NaN"), "metrics.loss_end"),
    (metrics_json(steps=-1), "metrics.steps"),
    ('{"loss_start": 1.0, "loss_end": 1.0, "steps": 1, "tokens": 1}', "metrics.seconds"),
])
def test_malformed_metrics_are_400_naming_the_field(claimed, cpu_worker, state, checkpoint_storage, metrics, field):
    task, _ = claimed
    before = stored_files(checkpoint_storage)
    response = upload(cpu_worker, task.pk, random_update(state, scale=1e-3), metrics)
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "invalid" and body["detail"].startswith(field), body
    _assert_nothing_stored(task, before, checkpoint_storage)


def test_missing_update_file_is_400(claimed, cpu_worker):
    task, _ = claimed
    response = client_for(cpu_worker).post(f"/api/v1/tasks/{task.pk}/result", {"metrics": metrics_json()},
                                           format="multipart")
    assert response.status_code == 400 and response.json()["detail"].startswith("update")


def test_oversized_update_is_413_before_reading(claimed, cpu_worker, state, checkpoint_storage, monkeypatch):
    task, _ = claimed
    before = stored_files(checkpoint_storage)
    huge = encode_update({k: torch.zeros(v.shape) for k, v in state.items()}, "fp32")  # 4x an int8 update
    response = upload(cpu_worker, task.pk, huge + b"\0" * 100_000, metrics_json())
    assert response.status_code == 413 and response.json()["error"] == "too_large"
    _assert_nothing_stored(task, before, checkpoint_storage)

    # The Content-Length check refuses before the multipart body is parsed at all.
    from rest_framework.request import Request

    def boom(self):
        raise AssertionError("the body was parsed")

    monkeypatch.setattr(Request, "_load_data_and_files", boom)
    limit = services.max_upload_bytes(task.round.run)
    response = client_for(cpu_worker).generic("POST", f"/api/v1/tasks/{task.pk}/result", b"x" * (limit + 70_000),
                                              content_type="multipart/form-data; boundary=x")
    assert response.status_code == 413


def test_someone_elses_task_is_403(claimed, gpu_worker, state, checkpoint_storage):
    task, _ = claimed
    before = stored_files(checkpoint_storage)
    response = upload(gpu_worker, task.pk, random_update(state, scale=1e-3), metrics_json())
    assert response.status_code == 403 and response.json()["error"] == "not_your_task"
    _assert_nothing_stored(task, before, checkpoint_storage)


def test_late_upload_is_410(claimed, cpu_worker, state, checkpoint_storage):
    task, _ = claimed
    Task.objects.filter(pk=task.pk).update(deadline=task.claimed_at)
    task.refresh_from_db()
    before = stored_files(checkpoint_storage)
    response = upload(cpu_worker, task.pk, random_update(state, scale=1e-3), metrics_json())
    assert response.status_code == 410 and response.json()["error"] == "task_expired"
    _assert_nothing_stored(task, before, checkpoint_storage)

    services.round_expire_late_tasks(round_id=task.round_id)
    response = upload(cpu_worker, task.pk, random_update(state, scale=1e-3), metrics_json())
    assert response.status_code == 410 and response.json()["error"] == "task_expired"


def test_second_upload_is_409(claimed, cpu_worker, state, checkpoint_storage):
    task, _ = claimed
    assert upload(cpu_worker, task.pk, random_update(state, scale=1e-3), metrics_json()).status_code == 202
    task.refresh_from_db()
    before = stored_files(checkpoint_storage)
    response = upload(cpu_worker, task.pk, random_update(state, scale=2e-3, seed=1), metrics_json())
    assert response.status_code == 409 and response.json()["error"] == "task_completed"
    assert stored_files(checkpoint_storage) == before
    assert Task.objects.get(pk=task.pk).update_sha256 == task.update_sha256


def test_unknown_task_is_404(db, cpu_worker, state):
    assert upload(cpu_worker, 999999, b"x", metrics_json()).status_code == 404


def test_fail_issues_the_shard_again(claimed, cpu_worker, gpu_worker):
    task, _ = claimed
    response = client_for(cpu_worker).post(f"/api/v1/tasks/{task.pk}/fail", {"reason": "CUDA out of memory"},
                                           format="json")
    assert response.status_code == 200 and response.json()["status"] == "failed"
    task.refresh_from_db()
    assert task.status == Task.Status.FAILED and task.reason == "CUDA out of memory"
    replacement = Task.objects.get(replaces=task)
    assert replacement.status == Task.Status.PENDING and replacement.shard_index == task.shard_index
    # The worker may work on the round again, on the shard that is still waiting rather than the one it lost.
    again = client_for(cpu_worker).post("/api/v1/tasks/claim").json()
    assert again["dataset"]["shard_index"] != task.shard_index
    assert client_for(cpu_worker).post("/api/v1/tasks/claim").status_code == 204  # one live task per round
    assert client_for(gpu_worker).post("/api/v1/tasks/claim").json()["id"] == replacement.pk
    assert client_for(gpu_worker).post(f"/api/v1/tasks/{task.pk}/fail", {"reason": "x"}, format="json").status_code == 403
    assert Entry.objects.filter(action="task.failed").count() == 1
