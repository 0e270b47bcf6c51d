"""Model versions: accepted rounds publish numbered versions; runs of one model branch and never overwrite."""

import pytest

from ledger.models import Entry
from tests.marketplace.factories import WorkerFactory
from training import blobs, services
from training.models import ModelVersion, Round, TrainingRun

from .factories import TINY_CONFIG, approved_proposal, random_update, train_update

pytestmark = pytest.mark.django_db
ONE_WORKER = {"workers_per_round": 1, "min_workers": 1, "aggregator": "mean"}


def _aggregate_open_round(run, worker, make=None):
    from rest_framework.test import APIRequestFactory

    from training.serializers import task_payload

    task = services.task_claim(worker=worker)
    assert task is not None and task.round.run_id == run.pk
    body = task_payload(task, request=APIRequestFactory().get("/"), guardrails=[], max_upload_bytes=0)
    data, metrics = (make or train_update)(body)
    services.task_submit_result(task_id=task.pk, worker=worker, data=data, metrics=metrics)
    return services.round_aggregate(round_id=task.round_id)


def test_runs_of_one_model_branch_from_the_latest_version_and_keep_every_result():
    model = services.community_model_ensure(slug="tiny-gpt", name="Tiny", arch="byte-gpt", config=TINY_CONFIG,
                                            seed=11)
    v1 = ModelVersion.objects.get(model=model)
    assert v1.number == 1 and v1.checkpoint_id == model.current_checkpoint_id
    a = services.run_start(proposal_id=approved_proposal(model={"init": "latest"}, diloco=ONE_WORKER).pk)
    b = services.run_start(proposal_id=approved_proposal(model={"init": "current"},
                                                          diloco={**ONE_WORKER, "rounds": 1}).pk)
    assert a.base_version == b.base_version == v1 and a.base_checkpoint_id == v1.checkpoint_id
    created = [e.payload for e in Entry.objects.filter(action="run.created").order_by("seq")]
    assert [p["alongside_runs"] for p in created] == [[], [a.pk]]

    worker_a, worker_b = WorkerFactory(gpus=[]), WorkerFactory(gpus=[])
    a1 = _aggregate_open_round(a, worker_a)
    b1 = _aggregate_open_round(b, worker_b)
    a2 = _aggregate_open_round(a, worker_a)
    assert a1.accepted and b1.accepted and a2.accepted

    versions = {v.number: v for v in ModelVersion.objects.filter(model=model)}
    assert sorted(versions) == [1, 2, 3, 4]
    assert (versions[2].run, versions[2].round, versions[2].parent) == (a, a1, v1)
    assert (versions[3].run, versions[3].round, versions[3].parent) == (b, b1, v1)  # b's branch
    assert (versions[4].run, versions[4].parent) == (a, versions[2])
    assert versions[4].checkpoint_id == a2.checkpoint_out_id != versions[3].checkpoint_id
    assert versions[3].checkpoint_id == TrainingRun.objects.get(pk=b.pk).final_checkpoint_id  # b finished, kept
    assert versions[2].eval_loss == pytest.approx(a1.eval_loss_after)
    published = Entry.objects.filter(action="model.version_published").order_by("seq")
    assert [(e.payload["version"], e.payload["parent"], e.payload["run_id"]) for e in published] == [
        (2, 1, a.pk), (3, 1, b.pk), (4, 2, a.pk)]

    model.refresh_from_db()
    assert model.current_checkpoint_id == versions[4].checkpoint_id
    c = services.run_start(proposal_id=approved_proposal(model={"init": "latest"}, diloco=ONE_WORKER).pk)
    assert c.base_version == versions[4] and c.base_checkpoint_id == versions[4].checkpoint_id
    older = services.run_start(proposal_id=approved_proposal(model={"init": 3}, diloco=ONE_WORKER).pk)
    assert older.base_version == versions[3] and older.status == TrainingRun.Status.RUNNING


def test_a_rejected_round_publishes_no_version():
    services.community_model_ensure(slug="tiny-gpt", name="Tiny", arch="byte-gpt", config=TINY_CONFIG, seed=11)
    run = services.run_start(proposal_id=approved_proposal(diloco=ONE_WORKER).pk)
    reference = blobs.checkpoint_state(run.base_checkpoint_id)[0]
    poisoned = _aggregate_open_round(run, WorkerFactory(gpus=[]),
                                     lambda body: (random_update(reference, scale=50.0), train_update(body)[1]))
    assert poisoned.status == Round.Status.REJECTED
    assert list(ModelVersion.objects.values_list("number", flat=True)) == [1]
    assert not Entry.objects.filter(action="model.version_published").exists()


def test_a_missing_or_mismatched_version_fails_the_run_with_its_reason():
    services.community_model_ensure(slug="tiny-gpt", name="Tiny", arch="byte-gpt", config=TINY_CONFIG, seed=11)
    missing = services.run_start(proposal_id=approved_proposal(model={"init": 9}).pk)
    assert missing.status == TrainingRun.Status.FAILED and "no version 9" in missing.reason
    assert not Round.objects.filter(run=missing).exists()
    assert Entry.objects.get(action="run.failed").payload == {"run_id": missing.pk, "reason": missing.reason}

    other = dict(TINY_CONFIG, n_layer=2)
    mismatch = services.run_start(proposal_id=approved_proposal(model={"init": 1, "config": other}).pk)
    assert mismatch.status == TrainingRun.Status.FAILED and "another config" in mismatch.reason
    fresh = services.run_start(proposal_id=approved_proposal(model={"init": "latest", "config": other}).pk)
    assert fresh.status == TrainingRun.Status.RUNNING and fresh.base_version is None  # latest: as before, scratch
