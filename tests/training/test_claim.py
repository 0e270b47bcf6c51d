import threading

import pytest
from django.db import connection, connections

from ledger.models import Entry
from tests.marketplace.factories import WorkerFactory
from training import services
from training.models import Task

from .conftest import client_for
from .factories import TINY_CONFIG, approved_proposal

pytestmark = pytest.mark.django_db


@pytest.fixture
def run():
    return services.run_start(proposal_id=approved_proposal().pk)


def test_claim_returns_the_task_json_of_the_protocol(run, cpu_worker):
    from tests.governance.factories import GuardrailFactory

    GuardrailFactory(kind="data_filter", patterns=[r"\bsecret\b"], title="No secrets")
    GuardrailFactory(kind="output_filter", patterns=["rude"], title="Polite")
    response = client_for(cpu_worker).post("/api/v1/tasks/claim")

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"id", "run_id", "round", "checkpoint_sha256", "checkpoint_url", "model", "dataset", "inner",
                         "compression", "density", "sparse_chunk", "error_feedback_beta", "guardrails", "seed",
                         "optimizer",
                         "deadline", "max_upload_bytes", "overlap", "delta_from_sha256", "delta_sha256"}
    assert body["density"] == 0.02 and body["error_feedback_beta"] is None  # int8: no error feedback
    assert body["sparse_chunk"] == 4096  # the field's default; a dense codec does not use it
    task = Task.objects.get(pk=body["id"])
    assert task.status == Task.Status.ASSIGNED and task.worker == cpu_worker
    assert body["run_id"] == run.pk and body["round"] == 1
    assert body["checkpoint_sha256"] == run.base_checkpoint_id
    assert body["checkpoint_url"].endswith(f"/api/v1/checkpoints/{run.base_checkpoint_id}")
    assert body["model"] == {"arch": "byte-gpt", "config": TINY_CONFIG}
    assert body["dataset"] == {"source": "builtin:python-docs", "sha256": None, "heldout_fraction": 0.1,
                               "shard_index": task.shard_index, "shard_count": 2}
    assert body["inner"] == {"steps": 3, "lr": 0.003, "batch_size": 4, "seq_len": 32, "weight_decay": 0.1,
                             "warmup": 0, "grad_clip": 1.0}
    assert body["compression"] == "int8" and body["seed"] == task.seed
    assert [g["title"] for g in body["guardrails"]] == ["No secrets"]
    assert set(body["guardrails"][0]) == {"id", "title", "kind", "patterns", "description"}
    assert body["max_upload_bytes"] > 0
    assert Entry.objects.filter(action="task.claimed", subject=f"run:{run.pk}").count() == 1


def test_a_sparse_task_names_the_runs_chunk_and_its_upload_bound_follows_it(cpu_worker):
    import torch

    from diloco.codecs import encode_update
    from training import blobs

    run = services.run_start(proposal_id=approved_proposal(diloco={"compression": "topk2"}).pk)
    body = client_for(cpu_worker).post("/api/v1/tasks/claim").json()
    assert run.diloco["sparse_chunk"] == 4096 and body["sparse_chunk"] == 4096  # the sparse default
    run.spec["diloco"]["sparse_chunk"] = 32768  # a run that chose larger chunks
    run.save(update_fields=["spec"])
    body["max_upload_bytes"] = services.max_upload_bytes(run)
    state, _ = blobs.checkpoint_state(body["checkpoint_sha256"])
    g = torch.Generator().manual_seed(0)
    delta = {k: torch.randn(v.shape, generator=g) for k, v in state.items()}
    # An update cut into the run's chunks fits in either offset form, and so does one cut into the 4096
    # of agents from before the setting.
    for chunk, idx in ((32768, "int16"), (32768, "ef"), (4096, "int16"), (4096, "ef")):
        update = encode_update(delta, "topk2", chunk=chunk, idx=idx)
        assert len(update) <= body["max_upload_bytes"], (chunk, idx)
    # On this small model an earlier agent's chunk of 32768 keeps more values than 4096 (each tensor is
    # shorter than a chunk and kept min(topk, length) of its values): the bound grows with the run's chunk.
    bound = services.max_upload_bytes(run)
    run.spec["diloco"]["sparse_chunk"] = 4096
    assert services.max_upload_bytes(run) < bound


def test_a_run_from_before_the_chunk_setting_gets_4096(cpu_worker):
    run = services.run_start(proposal_id=approved_proposal(diloco={"compression": "topk2"}).pk)
    run.spec["diloco"]["sparse_chunk"] = 4096
    explicit = services.max_upload_bytes(run)
    del run.spec["diloco"]["sparse_chunk"]  # a spec frozen before the key existed
    run.save(update_fields=["spec"])
    assert services.max_upload_bytes(run) == explicit
    body = client_for(cpu_worker).post("/api/v1/tasks/claim").json()
    assert body["sparse_chunk"] == 4096 and body["compression"] == "topk2"


def test_no_work_is_204(db, cpu_worker):
    assert client_for(cpu_worker).post("/api/v1/tasks/claim").status_code == 204


def test_claim_needs_a_worker_token(run, member_client, api_client):
    assert api_client.post("/api/v1/tasks/claim").status_code == 401
    assert member_client.post("/api/v1/tasks/claim").status_code == 403


def test_one_task_per_worker_per_round(run, cpu_worker):
    client = client_for(cpu_worker)
    assert client.post("/api/v1/tasks/claim").status_code == 200
    assert client.post("/api/v1/tasks/claim").status_code == 204
    assert Task.objects.filter(worker=cpu_worker).count() == 1


def test_cpu_worker_needs_allow_cpu_and_gpu_worker_needs_enough_memory(cpu_worker, gpu_worker):
    services.run_start(proposal_id=approved_proposal(hardware={"allow_cpu": False, "min_vram_mb": 40000}).pk)
    assert client_for(cpu_worker).post("/api/v1/tasks/claim").status_code == 204
    assert client_for(gpu_worker).post("/api/v1/tasks/claim").status_code == 204  # 24 GB < 40 GB

    services.run_start(proposal_id=approved_proposal(model={"name": "gpu-only"},
                                                     hardware={"allow_cpu": False, "min_vram_mb": 16000}).pk)
    assert client_for(cpu_worker).post("/api/v1/tasks/claim").status_code == 204
    body = client_for(gpu_worker).post("/api/v1/tasks/claim").json()
    assert Task.objects.get(pk=body["id"]).round.run.model.slug == "gpu-only"


def test_claims_take_the_oldest_pending_task_first(cpu_worker, gpu_worker):
    first = services.run_start(proposal_id=approved_proposal().pk)
    services.run_start(proposal_id=approved_proposal(model={"name": "second"}).pk)
    assert client_for(cpu_worker).post("/api/v1/tasks/claim").json()["run_id"] == first.pk
    assert client_for(gpu_worker).post("/api/v1/tasks/claim").json()["run_id"] == first.pk


def test_suspended_worker_cannot_claim(run):
    worker = WorkerFactory(gpus=[], status="suspended")
    response = client_for(worker).post("/api/v1/tasks/claim")
    assert response.status_code == 403 and response.json()["error"] == "worker_suspended"


@pytest.mark.django_db(transaction=True)
def test_racing_workers_get_different_tasks():
    """Eight workers claim at once on two tasks: exactly two get one each (SKIP LOCKED on PostgreSQL)."""
    run = services.run_start(proposal_id=approved_proposal(diloco={"workers_per_round": 2}).pk)
    workers = [WorkerFactory(gpus=[]) for _ in range(8)]
    barrier = threading.Barrier(len(workers))
    got, errors = {}, []

    def claim(worker):
        try:
            barrier.wait()
            for _attempt in range(20):
                try:
                    task = services.task_claim(worker=worker)
                    break
                except Exception as exc:  # SQLite may report "database is locked" under contention
                    if "locked" not in str(exc):
                        raise
            got[worker.pk] = task.pk if task else None
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=claim, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    claimed = [t for t in got.values() if t is not None]
    assert len(claimed) == 2 and len(set(claimed)) == 2, (connection.vendor, got)
    assert set(claimed) == set(Task.objects.filter(round__run=run).values_list("pk", flat=True))
