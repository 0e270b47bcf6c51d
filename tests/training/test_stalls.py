"""Rounds always make progress: lost tasks are taken again, starved rounds fail by the spec's rules."""

from datetime import timedelta

import pytest
from django.db import IntegrityError, transaction
from django.utils import timezone
from rest_framework.test import APIRequestFactory

from ledger.models import Entry
from ledger.selectors import ledger_verify
from marketplace.models import CreditGrant
from tests.marketplace.factories import WorkerFactory
from training import services, tasks
from training.models import Round, Task, TrainingRun
from training.serializers import task_payload
from training.services import assignment

from .conftest import client_for
from .factories import approved_proposal, train_update

pytestmark = pytest.mark.django_db

# Taken before the suite's fixture swaps it for a recorder (see conftest.py).
_REAL_ENQUEUE_ROUND_CHECK = assignment._enqueue_round_check


def _start(**diloco) -> TrainingRun:
    return services.run_start(proposal_id=approved_proposal(diloco=diloco).pk)


def _submit(task: Task, worker) -> None:
    body = task_payload(task, request=APIRequestFactory().get("/"), guardrails=[], max_upload_bytes=0)
    data, metrics = train_update(body)
    services.task_submit_result(task_id=task.pk, worker=worker, data=data, metrics=metrics)


def _past(rnd_or_task) -> timezone.datetime:
    rnd_or_task.refresh_from_db()
    return rnd_or_task.deadline + timedelta(seconds=1)


def test_when_every_worker_let_its_task_expire_the_replacements_are_claimed_and_the_round_finishes():
    """A web outage during uploads: both workers' tasks expire; they take the replacements and finish."""
    run = _start(workers_per_round=2, min_workers=2, rounds=1)
    a, b = WorkerFactory(gpus=[]), WorkerFactory(gpus=[])
    first_a, first_b = services.task_claim(worker=a), services.task_claim(worker=b)
    rnd = Round.objects.get(run=run)
    later = max(_past(first_a), _past(first_b))
    assert sorted(services.round_expire_late_tasks(round_id=rnd.pk, now=later)) == sorted([first_a.pk, first_b.pk])

    again_a, again_b = services.task_claim(worker=a), services.task_claim(worker=b)
    assert again_a is not None and again_b is not None
    assert {again_a.replaces_id, again_b.replaces_id} == {first_a.pk, first_b.pk}
    # Each takes the shard it has not lost yet, so a shard that trips one machine goes elsewhere.
    assert again_a.shard_index == first_b.shard_index and again_b.shard_index == first_a.shard_index
    assert services.task_claim(worker=a) is None  # never two live tasks in one round

    _submit(again_a, a)
    _submit(again_b, b)
    assert tasks.round_check(rnd.pk) is True
    rnd.refresh_from_db()
    assert rnd.status == Round.Status.DONE and rnd.accepted
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.FINISHED
    # Credits: once per accepted task, none for the expired ones.
    assert sorted(CreditGrant.objects.values_list("reference", flat=True)) == sorted(
        [f"task:{again_a.pk}", f"task:{again_b.pk}"])
    assert not Entry.objects.filter(action="round.extended").exists()
    assert ledger_verify().ok


def test_with_exactly_k_workers_an_early_failure_report_is_picked_up_by_the_same_worker():
    """A restarted agent reports its old task failed; with nobody else around it takes the shard again."""
    run = _start(workers_per_round=1, min_workers=1, rounds=1)
    worker = WorkerFactory(gpus=[])
    lost = services.task_claim(worker=worker)
    services.task_fail(task_id=lost.pk, worker=worker, reason="agent restarted")

    again = services.task_claim(worker=worker)
    assert again is not None and again.replaces_id == lost.pk and again.shard_index == lost.shard_index
    _submit(again, worker)
    assert tasks.round_check(Round.objects.get(run=run).pk) is True  # k results in: no waiting for the deadline
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.FINISHED
    assert list(CreditGrant.objects.values_list("reference", flat=True)) == [f"task:{again.pk}"]


def test_a_worker_with_a_late_task_gets_its_replacement_when_it_claims_before_any_sweep():
    run = _start(workers_per_round=1, rounds=1)
    worker = WorkerFactory(gpus=[])
    lost = services.task_claim(worker=worker)
    Task.objects.filter(pk=lost.pk).update(deadline=timezone.now() - timedelta(seconds=1))

    again = services.task_claim(worker=worker)
    assert again is not None and again.replaces_id == lost.pk
    assert Task.objects.get(pk=lost.pk).status == Task.Status.EXPIRED
    assert Round.objects.get(run=run).status == Round.Status.OPEN


def test_the_database_refuses_two_live_tasks_of_one_worker_in_a_round():
    run = _start(workers_per_round=2)
    worker = WorkerFactory(gpus=[])
    held = services.task_claim(worker=worker)
    other = Task.objects.filter(round__run=run, status=Task.Status.PENDING).get()
    with pytest.raises(IntegrityError), transaction.atomic():
        Task.objects.filter(pk=other.pk).update(worker=worker, status=Task.Status.ASSIGNED)
    Task.objects.filter(pk=held.pk).update(status=Task.Status.EXPIRED)
    Task.objects.filter(pk=other.pk).update(worker=worker, status=Task.Status.ASSIGNED)  # the lost one no longer counts


def test_a_starved_round_fails_after_its_extensions_and_is_tried_again(api_client, client):
    run = _start(workers_per_round=2, min_workers=2, rounds=1, max_round_extensions=2, max_failed_rounds=1)
    rnd = Round.objects.get(run=run)
    for extension in (1, 2):
        assert services.round_check(round_id=rnd.pk, now=_past(rnd)) is False
        rnd.refresh_from_db()
        assert rnd.status == Round.Status.OPEN and rnd.extensions == extension and rnd.attempt == 1
    # One result is in when the third deadline passes: kept for the next attempt.
    worker = WorkerFactory(gpus=[])
    kept = services.task_claim(worker=worker)
    _submit(kept, worker)
    now = _past(rnd)
    assert services.round_check(round_id=rnd.pk, now=now) is False

    rnd.refresh_from_db()
    assert rnd.status == Round.Status.OPEN and rnd.attempt == 2 and rnd.extensions == 0
    assert rnd.deadline > now and "attempt 1 of round 1 got 1 of the 2 result(s)" in rnd.reason
    failed = Entry.objects.get(action="round.failed")
    assert failed.payload["retry"] is True and failed.payload["attempt"] == 1 and failed.payload["results"] == 1
    assert Task.objects.get(pk=kept.pk).status == Task.Status.COMPLETED
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.RUNNING and run.failed_rounds == 1
    shown = api_client.get(f"/api/v1/runs/{run.pk}/").json()["rounds"][0]
    assert (shown["status"], shown["attempt"], shown["extensions"]) == ("open", 2, 0)
    assert "attempt 1 of round 1 got 1" in shown["reason"]
    assert "(attempt 2, deadline extended 0 times)" in client.get(f"/runs/{run.pk}/").content.decode()

    # The second attempt gets its second result and aggregates both.
    other = WorkerFactory(gpus=[])
    _submit(services.task_claim(worker=other), other)
    assert tasks.round_check(rnd.pk) is True
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.FINISHED
    assert CreditGrant.objects.count() == 2


def test_a_run_fails_with_its_reason_once_it_has_used_up_its_failed_rounds(api_client, client):
    run = _start(workers_per_round=1, min_workers=1, rounds=2, max_round_extensions=0, max_failed_rounds=1)
    rnd = Round.objects.get(run=run)
    worker = WorkerFactory(gpus=[])
    stuck = services.task_claim(worker=worker)
    services.round_check(round_id=rnd.pk, now=_past(rnd))  # attempt 1 fails, attempt 2 opens
    rnd.refresh_from_db()
    assert rnd.attempt == 2 and rnd.status == Round.Status.OPEN
    services.round_check(round_id=rnd.pk, now=_past(rnd) + timedelta(seconds=120))  # attempt 2 fails: run fails

    run.refresh_from_db()
    rnd.refresh_from_db()
    assert run.status == TrainingRun.Status.FAILED and run.finished_at is not None
    assert "round 1 failed" in run.reason and "allows 1 failed round attempt" in run.reason
    assert rnd.status == Round.Status.FAILED and rnd.reason
    assert not Task.objects.filter(round=rnd, status__in=[Task.Status.PENDING, Task.Status.ASSIGNED]).exists()
    assert Task.objects.get(pk=stuck.pk).status == Task.Status.EXPIRED
    assert [e.payload["retry"] for e in Entry.objects.filter(action="round.failed").order_by("seq")] == [True, False]
    assert Entry.objects.get(action="run.failed").payload["reason"] == run.reason
    assert not Round.objects.filter(run=run, index=2).exists()
    assert services.task_claim(worker=WorkerFactory(gpus=[])) is None
    assert services.round_check(round_id=rnd.pk, now=timezone.now() + timedelta(days=1)) is False
    assert Entry.objects.filter(action__in=["round.failed", "run.failed", "round.extended"]).count() == 3

    body = api_client.get(f"/api/v1/runs/{run.pk}/").json()
    assert body["status"] == "failed" and body["reason"] == run.reason
    assert body["rounds"][0]["status"] == "failed" and body["rounds"][0]["attempt"] == 2
    page = client.get(f"/runs/{run.pk}/").content.decode()
    assert "round 1 failed" in page
    assert ledger_verify().ok


def test_without_the_rules_in_the_spec_the_defaults_bound_the_extensions():
    run = _start(workers_per_round=1, min_workers=1, rounds=1)
    spec = dict(run.spec)
    spec["diloco"] = {k: v for k, v in spec["diloco"].items()
                      if k not in ("max_round_extensions", "max_failed_rounds")}  # a spec frozen before the rules
    TrainingRun.objects.filter(pk=run.pk).update(spec=spec)
    rnd = Round.objects.get(run=run)
    checks = 0
    while TrainingRun.objects.get(pk=run.pk).status == TrainingRun.Status.RUNNING:
        services.round_check(round_id=rnd.pk, now=_past(rnd))
        checks += 1
        assert checks < 100
    expected = (services.DEFAULT_MAX_ROUND_EXTENSIONS + 1) * (services.DEFAULT_MAX_FAILED_ROUNDS + 1)
    assert checks == expected
    assert TrainingRun.objects.get(pk=run.pk).status == TrainingRun.Status.FAILED


@pytest.mark.parametrize(("field", "value"), [("max_round_extensions", -1), ("max_round_extensions", 101),
                                              ("max_failed_rounds", -1), ("max_failed_rounds", "two")])
def test_the_round_failure_rules_are_validated_with_the_field_named(field, value):
    from rest_framework.exceptions import ValidationError

    from governance.specs import spec_normalise
    from tests.training.factories import tiny_spec

    spec = tiny_spec()
    spec["diloco"][field] = value
    with pytest.raises(ValidationError) as caught:
        spec_normalise(kind="training", spec=spec)
    assert field in caught.value.detail["spec"]["diloco"]


def test_a_worker_without_a_task_in_the_round_still_gets_the_oldest(cpu_worker):
    _start(workers_per_round=2)
    client = client_for(cpu_worker)
    assert client.post("/api/v1/tasks/claim").json()["dataset"]["shard_index"] == 0


def test_an_upload_while_the_broker_is_down_is_still_accepted(monkeypatch, django_capture_on_commit_callbacks):
    """The round check enqueued after the upload commits cannot be sent: logged, and the tick catches up."""
    import json

    from django.core.files.uploadedfile import SimpleUploadedFile

    from .factories import METRICS

    def broker_down(*args):
        raise ConnectionError("broker down")

    monkeypatch.setattr("training.services.assignment._enqueue_round_check", _REAL_ENQUEUE_ROUND_CHECK)
    monkeypatch.setattr(tasks.round_check, "delay", broker_down)
    run = _start(workers_per_round=1, rounds=1)
    worker = WorkerFactory(gpus=[])
    task = services.task_claim(worker=worker)
    body = task_payload(task, request=APIRequestFactory().get("/"), guardrails=[], max_upload_bytes=0)
    data, _ = train_update(body)
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = client_for(worker).post(f"/api/v1/tasks/{task.pk}/result", {
            "update": SimpleUploadedFile("u.safetensors", data), "metrics": json.dumps(METRICS)})
    assert response.status_code == 202, response.content
    assert callbacks  # the enqueue was attempted
    assert Task.objects.get(pk=task.pk).status == Task.Status.COMPLETED
    assert tasks.tick()["ready"] == [Round.objects.get(run=run).pk]
