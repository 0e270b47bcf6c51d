"""The server's norm reference: a round that accepted only a tiny update (a free-rider's, say) does not set
the bar for the rounds after it, and the run keeps going."""

import pytest

from tests.marketplace.factories import WorkerFactory
from training import services
from training.models import Round, Task
from training.serializers import task_payload
from training.services import aggregation

from .factories import approved_proposal, train_update

pytestmark = pytest.mark.django_db


def _play(run, workers):
    from rest_framework.test import APIRequestFactory

    request = APIRequestFactory().get("/")
    for worker in workers:
        task = services.task_claim(worker=worker)
        body = task_payload(task, request=request, guardrails=[], max_upload_bytes=0)
        data, metrics = train_update(body)
        services.task_submit_result(task_id=task.pk, worker=worker, data=data, metrics=metrics)


def test_a_round_that_accepted_one_tiny_update_does_not_stall_the_run(settings):
    settings.AGORA_SCORE_CONTRIBUTIONS = False  # screening alone is under test here
    run = services.run_start(proposal_id=approved_proposal(diloco={
        "rounds": 3, "workers_per_round": 3, "min_workers": 3, "aggregator": "mean"}).pk)
    workers = [WorkerFactory(gpus=[]) for _ in range(3)]
    _play(run, workers)
    assert services.round_aggregate(round_id=Round.objects.get(run=run, index=1).pk).accepted
    # Make round 1 one that accepted a single tiny update: what the old reference (the latest accepted
    # round's median) then held every later update against.
    first = list(Task.objects.filter(round__run=run, round__index=1).order_by("id"))
    honest_norm = first[0].update_norm
    Task.objects.filter(pk=first[0].pk).update(update_norm=honest_norm / 1000)
    Task.objects.filter(pk__in=[t.pk for t in first[1:]]).update(status=Task.Status.REJECTED)
    assert aggregation._previous_accepted_norms(Round.objects.get(run=run, index=2)) == []

    _play(run, workers)
    rnd = services.round_aggregate(round_id=Round.objects.get(run=run, index=2).pk)
    assert rnd.accepted, (rnd.reason, list(Task.objects.filter(round=rnd).values_list("status", "reason")))
    assert Task.objects.filter(round=rnd, status=Task.Status.ACCEPTED).count() == 3
    # Round 3's reference pools round 1's one norm with round 2's three.
    pooled = aggregation._previous_accepted_norms(Round.objects.get(run=run, index=3))
    assert len(pooled) == 4 and sorted(pooled)[0] == pytest.approx(honest_norm / 1000)
    _play(run, workers)
    assert services.round_aggregate(round_id=Round.objects.get(run=run, index=3).pk).accepted
