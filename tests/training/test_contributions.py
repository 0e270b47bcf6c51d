"""The server's round checks every update as work: honest agents of a few inner steps are credited and their
scores shown; a free-rider uploading the last public outer step, or its own earlier upload again, earns
nothing, costs reliability and is suspended once reliability falls under the threshold."""

import json

import pytest
from rest_framework.test import APIRequestFactory

from diloco.codecs import encode_update
from ledger.models import Entry
from ledger.selectors import ledger_verify
from marketplace.models import CreditGrant, Worker
from tests.marketplace.factories import WorkerFactory
from training import blobs, services
from training.models import Round, Task
from training.serializers import task_payload

from .factories import approved_proposal, metrics_json, train_update

pytestmark = pytest.mark.django_db


def _round(run, index):
    return Round.objects.get(run=run, index=index)


def _play(run, workers, make):
    request = APIRequestFactory().get("/")
    tasks = []
    for i, worker in enumerate(workers):
        task = services.task_claim(worker=worker)
        body = task_payload(task, request=request, guardrails=[], max_upload_bytes=0)
        data = make(body, i)
        services.task_submit_result(task_id=task.pk, worker=worker, data=data, metrics=json.loads(metrics_json()))
        tasks.append(task)
    return tasks


def test_honest_agents_are_credited_and_free_riders_earn_nothing(member_client, settings):
    settings.AGORA_SUSPEND_BELOW_RELIABILITY, settings.AGORA_SUSPEND_AFTER_TASKS = 0.45, 2
    run = services.run_start(proposal_id=approved_proposal(diloco={
        "rounds": 3, "workers_per_round": 4, "min_workers": 3, "aggregator": "trimmed_mean",
        "trim_fraction": 0.25}).pk)
    workers = [WorkerFactory(gpus=[]) for _ in range(4)]
    first_upload = {}

    def honest(body, i):
        data, _ = train_update(body)
        first_upload.setdefault(i, data)
        return data

    # Round 1: everybody works.
    _play(run, workers, honest)
    services.round_aggregate(round_id=_round(run, 1).pk)
    r1 = _round(run, 1)
    assert r1.accepted and r1.step_sketch and len(r1.step_sketch) == 1024
    assert all(t.status == Task.Status.ACCEPTED and t.score["passed"] and t.score["own_gain"] > 0
               for t in r1.tasks.all()), [(t.reason, t.score) for t in r1.tasks.all()]
    assert all(len(t.update_sketch) == 1024 for t in r1.tasks.all())

    # Round 2: worker 2 uploads the public outer step of round 1, worker 3 its round-1 upload again.
    def round2(body, i):
        if i == 2:
            before = blobs.checkpoint_state(r1.checkpoint_in_id)[0]
            after = blobs.checkpoint_state(r1.checkpoint_out_id)[0]
            return encode_update({k: before[k] - after[k] for k in before}, "int8")
        if i == 3:
            return first_upload[3]
        return honest(body, i)

    tasks = _play(run, workers, round2)
    services.round_aggregate(round_id=_round(run, 2).pk)
    r2 = _round(run, 2)
    assert r2.accepted
    honest_tasks = [Task.objects.get(pk=t.pk) for t in tasks[:2]]
    public, replay = Task.objects.get(pk=tasks[2].pk), Task.objects.get(pk=tasks[3].pk)
    assert all(t.status == Task.Status.ACCEPTED and t.credit > 0 for t in honest_tasks)
    assert public.status == Task.Status.REJECTED and "public outer step of round 1" in public.reason
    assert replay.status == Task.Status.REJECTED and "same sha256" in replay.reason
    assert public.score["passed"] is False and replay.score["replay_of"].startswith("task ")
    credited = set(CreditGrant.objects.values_list("reference", flat=True))
    assert f"task:{public.pk}" not in credited and f"task:{replay.pk}" not in credited
    payload = [e.payload for e in Entry.objects.filter(action="round.aggregated") if e.payload["round"] == 2][0]
    codes = {r["task_id"]: (r["code"], r["blamed"]) for r in payload["rejected"]}
    assert codes == {public.pk: ("replay", True), replay.pk: ("replay", True)}
    # Reliability fell for the free-riders (0.5 -> 0.55 -> 0.495) and rose for the honest workers.
    riders = Worker.objects.filter(pk__in=[workers[2].pk, workers[3].pk])
    assert all(w.reliability < 0.5 for w in riders)
    assert all(Worker.objects.get(pk=w.pk).reliability > 0.5 for w in workers[:2])

    # Scores are in the API (per round, per task) and on the run page; sketches are not published.
    detail = member_client.get(f"/api/v1/runs/{run.pk}/").json()
    round2 = [r for r in detail["rounds"] if r["index"] == 2][0]
    by_id = {t["id"]: t for t in round2["tasks"]}
    assert by_id[honest_tasks[0].pk]["score"]["passed"] is True
    assert by_id[public.pk]["score"]["passed"] is False
    assert "update_sketch" not in by_id[public.pk] and "step_sketch" not in round2
    page = member_client.get(f"/runs/{run.pk}/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "public outer step of round 1" in html and "Scores" in html
    assert f"#{public.shard_index} replay" in html
    own = honest_tasks[0].score["own_gain"]
    assert f"#{honest_tasks[0].shard_index} {own:.3f}" in html
    assert ledger_verify().ok


def test_a_free_rider_is_suspended_automatically(settings):
    settings.AGORA_SUSPEND_BELOW_RELIABILITY, settings.AGORA_SUSPEND_AFTER_TASKS = 0.46, 2
    run = services.run_start(proposal_id=approved_proposal(diloco={
        "rounds": 3, "workers_per_round": 3, "min_workers": 3, "aggregator": "mean"}).pk)
    workers = [WorkerFactory(gpus=[]) for _ in range(3)]
    kept = {}

    def play(body, i):
        data, _ = train_update(body)
        if i == 2:
            kept.setdefault(i, data)
            return kept[i]  # works in round 1, then replays that upload
        return data

    for index in (1, 2, 3):
        _play(run, workers, play)
        services.round_aggregate(round_id=_round(run, index).pk)
    rider = Worker.objects.get(pk=workers[2].pk)
    # 0.5 -> 0.55 (round 1) -> 0.495 -> 0.4455 (< 0.46 after three results): suspended.
    assert rider.status == Worker.Status.SUSPENDED and "automatically" in rider.status_reason
    entry = Entry.objects.get(action="worker.suspended")
    assert entry.payload["automatic"] is True and entry.payload["worker_id"] == rider.pk
    assert all(Worker.objects.get(pk=w.pk).status == Worker.Status.ACTIVE for w in workers[:2])
    assert CreditGrant.objects.filter(worker=rider).count() == 1  # round 1's real work only


def test_checks_can_be_turned_off(settings):
    settings.AGORA_SCORE_CONTRIBUTIONS = False
    run = services.run_start(proposal_id=approved_proposal(diloco={"rounds": 1, "workers_per_round": 2}).pk)
    workers = [WorkerFactory(gpus=[]) for _ in range(2)]
    _play(run, workers, lambda body, i: train_update(body)[0])
    services.round_aggregate(round_id=_round(run, 1).pk)
    r1 = _round(run, 1)
    assert r1.accepted and r1.step_sketch is None
    assert all(t.score is None and t.update_sketch is None for t in r1.tasks.all())
