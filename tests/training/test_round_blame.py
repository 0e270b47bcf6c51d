"""An honest update turned away by a round whose step then fails costs its worker nothing."""

import json

import pytest

from diloco.codecs import decode_update, encode_update
from ledger.models import Entry
from marketplace.models import CreditGrant, Worker
from tests.marketplace.factories import WorkerFactory
from training import blobs, services
from training.models import Round, Task

from .factories import approved_proposal, metrics_json, train_update

pytestmark = pytest.mark.django_db


def _submit_all(run, workers, make):
    from rest_framework.test import APIRequestFactory

    from training.serializers import task_payload

    request = APIRequestFactory().get("/")
    tasks = []
    for i, worker in enumerate(workers):
        task = services.task_claim(worker=worker)
        body = task_payload(task, request=request, guardrails=[], max_upload_bytes=0)
        data, metrics = make(body, i)
        services.task_submit_result(task_id=task.pk, worker=worker, data=data, metrics=metrics)
        tasks.append(task)
    return tasks


def test_a_colluding_majority_cannot_cost_the_honest_worker_reliability():
    """Two colluders send the same update, far along the opposite of the honest one: they outvote it in
    screening, and the step their update makes is refused by the held-out evaluation (or by their own
    checks). The honest worker is neither credited nor blamed. (A NaN upload, the fault that needs no
    majority to see, is refused at upload already.)"""
    run = services.run_start(proposal_id=approved_proposal(
        diloco={"workers_per_round": 3, "min_workers": 3, "rounds": 1, "aggregator": "mean"}).pk)
    workers = [WorkerFactory(gpus=[]) for _ in range(3)]
    honest_update = {}

    def make(body, i):
        if i == 0:
            data, metrics = train_update(body)
            ref = blobs.model_reference("byte-gpt", body["model"]["config"])
            honest_update.update(decode_update(data, ref))
            return data, metrics
        return encode_update({k: -60 * v for k, v in honest_update.items()}, "int8"), json.loads(metrics_json())

    tasks = _submit_all(run, workers, make)
    rnd = services.round_aggregate(round_id=Round.objects.get(run=run).pk)
    assert rnd is not None and not rnd.accepted, rnd.reason
    honest = Task.objects.get(pk=tasks[0].pk)
    assert honest.status == Task.Status.REJECTED and honest.credit is None
    assert not CreditGrant.objects.exists()
    reliability = {w.pk: Worker.objects.get(pk=w.pk) for w in workers}
    fresh = WorkerFactory(gpus=[])
    assert reliability[workers[0].pk].reliability == fresh.reliability  # untouched
    payload = Entry.objects.get(action="round.rejected").payload
    rejected = {r["task_id"]: r for r in payload["rejected"]}
    assert rejected[honest.pk]["blamed"] is False and rejected[honest.pk]["code"] in ("direction", "norm_low")
