from datetime import timedelta

import pytest
from django.utils import timezone

from ledger.models import Entry
from tests.marketplace.factories import WorkerFactory
from training import services, tasks
from training.models import Round, Task

from .conftest import client_for
from .factories import approved_proposal

pytestmark = pytest.mark.django_db


def test_late_task_expires_and_its_shard_is_issued_again(cpu_worker, gpu_worker):
    run = services.run_start(proposal_id=approved_proposal(diloco={"workers_per_round": 1}).pk)
    task = services.task_claim(worker=cpu_worker)
    rnd = Round.objects.get(run=run)
    assert services.round_expire_late_tasks(round_id=rnd.pk) == []  # not late yet

    later = task.deadline + timedelta(seconds=1)
    assert services.round_expire_late_tasks(round_id=rnd.pk, now=later) == [task.pk]
    task.refresh_from_db()
    assert task.status == Task.Status.EXPIRED
    replacement = Task.objects.get(replaces=task)
    assert replacement.status == Task.Status.PENDING and replacement.shard_index == task.shard_index
    assert replacement.seed == task.seed
    assert Entry.objects.filter(action="task.expired").count() == 1

    body = client_for(gpu_worker).post("/api/v1/tasks/claim").json()
    assert body["id"] == replacement.pk and body["dataset"]["shard_index"] == task.shard_index
    # The late worker holds no live task in the round now, but there is nothing left to take.
    assert client_for(cpu_worker).post("/api/v1/tasks/claim").status_code == 204


def test_starved_round_is_extended_not_aggregated():
    run = services.run_start(proposal_id=approved_proposal(diloco={"workers_per_round": 2, "min_workers": 1}).pk)
    rnd = Round.objects.get(run=run)
    after = rnd.deadline + timedelta(seconds=1)
    assert services.round_check(round_id=rnd.pk, now=after) is False
    rnd.refresh_from_db()
    assert rnd.status == Round.Status.OPEN and rnd.deadline > after
    assert Entry.objects.filter(action="round.extended").count() == 1


def test_tick_starts_runs_and_expires_tasks(django_capture_on_commit_callbacks, monkeypatch):
    proposal = approved_proposal(diloco={"workers_per_round": 1})
    sent = []
    monkeypatch.setattr(tasks.aggregate_round, "delay", sent.append)
    result = tasks.tick()
    assert len(result["started"]) == 1 and result["ready"] == []
    worker = WorkerFactory(gpus=[])
    task = services.task_claim(worker=worker)
    Task.objects.filter(pk=task.pk).update(deadline=timezone.now() - timedelta(seconds=1))
    tasks.tick()
    assert Task.objects.get(pk=task.pk).status == Task.Status.EXPIRED
    assert Task.objects.filter(round__run__proposal=proposal, status=Task.Status.PENDING).count() == 1
    assert sent == []


def test_round_check_task_tolerates_a_missing_round(db):
    assert tasks.round_check(987654) is False
