"""Spot re-computation: replicas are issued for a sampled share of tasks, go to another worker with the same
device, an agreeing pair is credited twice, a disagreeing one costs the worker the round turns away, and a
replica that never comes back does not hold the round up."""

import json
from datetime import timedelta

import pytest
import torch
from django.utils import timezone

from diloco.codecs import decode_update, encode_update
from ledger.models import Entry
from marketplace.models import CreditGrant, Worker
from tests.marketplace.factories import WorkerFactory
from training import blobs, services
from training.models import Round, Task
from training.services import replicas
from training.services.rounds import _round_ready

from .factories import approved_proposal, cpu_worker, metrics_json, task_json, train_update

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def no_contribution_scores(settings):
    # A 4-step update of a tiny model scores too noisily to test the pairing with; the scores have their own tests.
    settings.AGORA_SCORE_CONTRIBUTIONS = False


def _run(monkeypatch, *, shards, k=2, fraction=0.5, **diloco):
    """A one-round run whose replicas go to ``shards`` (the draw is secret and random; tests pick it)."""
    if shards is not None:
        monkeypatch.setattr(replicas, "replica_shards", lambda run, index: list(shards))
    proposal = approved_proposal(diloco={"workers_per_round": k, "min_workers": 1, "rounds": 1, "inner_steps": 4,
                                         "replica_fraction": fraction, **diloco})
    return services.run_start(proposal_id=proposal.pk)




def _decode(data, body):
    return decode_update(data, blobs.model_reference("byte-gpt", body["model"]["config"]))


def test_replicas_are_issued_for_the_sampled_shards_as_the_same_work(monkeypatch):
    run = _run(monkeypatch, shards=None, k=8, fraction=0.5)
    rnd = Round.objects.get(run=run)
    sampled = replicas.replica_shards(run, 1)
    copies = Task.objects.filter(round=rnd, replica_of__isnull=False)
    assert sorted(copies.values_list("shard_index", flat=True)) == sampled
    for replica in copies:
        assert replica.replica_of.shard_index == replica.shard_index and replica.replica_of.seed == replica.seed
        assert replica.replica_of.replica_of_id is None
    # The draw is the spec's fraction over the run's rounds, different from round to round.
    draws = [replicas.replica_shards(run, index) for index in range(1, 101)]
    assert 0.4 < sum(map(len, draws)) / 800 < 0.6
    assert len({tuple(d) for d in draws}) > 20
    assert replicas.replica_shards(run, 5) == draws[4]


def test_no_replicas_when_the_fraction_is_zero(monkeypatch):
    run = _run(monkeypatch, shards=None, k=8, fraction=0.0)
    assert not Task.objects.filter(round__run=run, replica_of__isnull=False).exists()


def test_a_replica_goes_to_another_worker_after_every_first_task(monkeypatch):
    run = _run(monkeypatch, shards=[0], k=2)
    a, b, c, d = cpu_worker(), cpu_worker(), cpu_worker(), cpu_worker()
    first = services.task_claim(worker=a)
    second = services.task_claim(worker=b)
    assert first.replica_of_id is None and second.replica_of_id is None  # first tasks come first
    replica = services.task_claim(worker=c)
    assert replica.replica_of_id is not None and replica.shard_index == 0 == first.shard_index
    assert replica.worker_id not in (a.pk, b.pk)
    assert services.task_claim(worker=d) is None
    assert services.task_claim(worker=a) is None
    assert Round.objects.get(run=run).tasks.count() == 3


def test_a_worker_never_gets_the_replica_of_its_own_shard(monkeypatch):
    _run(monkeypatch, shards=[0], k=1)
    a, b = cpu_worker(), cpu_worker()
    mine = services.task_claim(worker=a)
    services.task_fail(task_id=mine.pk, worker=a, reason="out of memory")
    retry = services.task_claim(worker=b)  # the first task's replacement goes before the replica
    assert retry.replica_of_id is None and retry.shard_index == 0
    assert services.task_claim(worker=a) is None  # free again, but the replica repeats its own shard


def test_a_worker_that_lost_its_shard_takes_it_again_before_a_replica(monkeypatch):
    # Two workers, two shards, shard 0 sampled: b's download fails during a web outage, a has delivered
    # shard 0. If b took shard 0's replica it would hold its one live task of the round, a has its result
    # in, and shard 1 would wait for nobody until the round's deadline.
    run = _run(monkeypatch, shards=[0], k=2)
    a, b = cpu_worker(), cpu_worker()
    first = services.task_claim(worker=a)
    lost = services.task_claim(worker=b)
    assert (first.shard_index, lost.shard_index) == (0, 1)
    services.task_fail(task_id=lost.pk, worker=b, reason="checkpoint download failed")
    again = services.task_claim(worker=b)
    assert again.replica_of_id is None and again.shard_index == 1 and again.replaces_id == lost.pk
    assert Task.objects.filter(round__run=run, replica_of__isnull=False, status=Task.Status.PENDING).count() == 1


def test_a_replica_waits_for_its_first_task_and_a_worker_with_the_same_device(monkeypatch):
    _run(monkeypatch, shards=[0], k=1)
    gpu = WorkerFactory(gpus=[{"name": "NVIDIA H100", "memory_mb": 81920}])
    other_gpu = WorkerFactory(gpus=[{"name": "NVIDIA A10", "memory_mb": 24576}])
    same_gpu = WorkerFactory(gpus=[{"name": "NVIDIA H100", "memory_mb": 81920}])
    first = services.task_claim(worker=gpu)
    assert first.replica_of_id is None
    assert services.task_claim(worker=cpu_worker()) is None
    assert services.task_claim(worker=other_gpu) is None
    assert services.task_claim(worker=same_gpu).replica_of_id == first.pk


def test_an_agreeing_pair_is_credited_twice_and_enters_the_step_once(monkeypatch):
    run = _run(monkeypatch, shards=[0], k=2, aggregator="mean")
    a, b, c = cpu_worker(), cpu_worker(), cpu_worker()
    tasks = [services.task_claim(worker=w) for w in (a, b, c)]
    bodies = [task_json(t) for t in tasks]
    uploads = [train_update(body) for body in bodies]
    assert uploads[2][0] == uploads[0][0]  # the replica's payload is the same work, computed again
    rnd = Round.objects.get(run=run)
    for t, w, (data, metrics) in zip(tasks, (a, b, c), uploads, strict=True):
        services.task_submit_result(task_id=t.pk, worker=w, data=data, metrics=metrics)
    rnd = services.round_aggregate(round_id=rnd.pk)
    assert rnd is not None and rnd.accepted, rnd.reason
    done = {t.pk: Task.objects.get(pk=t.pk) for t in tasks}
    assert all(t.status == Task.Status.ACCEPTED and t.credit > 0 for t in done.values())
    assert done[tasks[2].pk].replica_check["agreed"] is True
    assert done[tasks[0].pk].replica_check["other_task"] == tasks[2].pk
    assert CreditGrant.objects.filter(worker=c).count() == 1
    # The step is the mean of the two shards' updates, not a mean weighting shard 0 twice.
    before, _ = blobs.checkpoint_state(rnd.checkpoint_in_id)
    after, _ = blobs.checkpoint_state(rnd.checkpoint_out_id)
    u0, u1 = _decode(uploads[0][0], bodies[0]), _decode(uploads[1][0], bodies[1])
    name = next(iter(before))
    step = before[name] - after[name]
    two = (u0[name] + u1[name]) / 2
    three = (2 * u0[name] + u1[name]) / 3
    assert torch.nn.functional.cosine_similarity(step.flatten(), two.flatten(), dim=0) > \
        torch.nn.functional.cosine_similarity(step.flatten(), three.flatten(), dim=0)
    entry = Entry.objects.get(action="round.replicas")
    assert entry.payload["sampled_shards"] == [0]
    assert entry.payload["pairs"][0]["agreed"] is True
    assert not Entry.objects.filter(action="task.replica_mismatch").exists()


def test_a_disagreeing_replica_earns_nothing_and_loses_reliability(monkeypatch):
    """The lazy worker sends something close to, but not, the work: 70% of the honest update plus noise. It
    passes screening, so the pair is settled by the round's robust centre, and the honest task is kept."""
    run = _run(monkeypatch, shards=[0], k=3, aggregator="mean")
    honest, other1, other2, lazy = cpu_worker(), cpu_worker(), cpu_worker(), cpu_worker()
    workers = (honest, other1, other2, lazy)
    tasks = [services.task_claim(worker=w) for w in workers]
    assert tasks[3].replica_of_id == tasks[0].pk
    uploads = {}
    for t, w in zip(tasks[:3], workers[:3], strict=True):
        uploads[t.pk] = train_update(task_json(t))
        services.task_submit_result(task_id=t.pk, worker=w, data=uploads[t.pk][0], metrics=uploads[t.pk][1])
    real = _decode(uploads[tasks[0].pk][0], task_json(tasks[0]))
    gen = torch.Generator().manual_seed(5)
    fake = {}
    for k, v in real.items():
        noise = torch.randn(v.shape, generator=gen)
        fake[k] = 0.7 * v + 0.5 * noise * (v.norm() / max(noise.norm(), 1e-12))
    services.task_submit_result(task_id=tasks[3].pk, worker=lazy, data=encode_update(fake, "int8"),
                                metrics=json.loads(metrics_json()))
    rnd = services.round_aggregate(round_id=Round.objects.get(run=run).pk)
    assert rnd is not None and rnd.accepted, rnd.reason
    kept, dropped = Task.objects.get(pk=tasks[0].pk), Task.objects.get(pk=tasks[3].pk)
    assert kept.status == Task.Status.ACCEPTED and kept.credit > 0
    assert dropped.status == Task.Status.REJECTED and dropped.credit is None, dropped.reason
    assert dropped.reason.startswith("replica mismatch")
    assert dropped.replica_check["agreed"] is False and dropped.replica_check["kept"] == kept.pk
    assert not CreditGrant.objects.filter(worker=lazy).exists()
    assert Worker.objects.get(pk=lazy.pk).reliability < Worker.objects.get(pk=other1.pk).reliability
    assert Worker.objects.get(pk=lazy.pk).reliability < WorkerFactory().reliability
    mismatch = Entry.objects.get(action="task.replica_mismatch")
    assert mismatch.payload["task_id"] == dropped.pk and mismatch.payload["worker_id"] == lazy.pk
    assert mismatch.payload["kept_task_id"] == kept.pk
    rejected = {r["task_id"]: r for r in Entry.objects.get(action="round.aggregated").payload["rejected"]}
    assert rejected[dropped.pk]["code"] == "replica_mismatch" and rejected[dropped.pk]["blamed"] is True


def test_a_replica_that_never_arrives_does_not_hold_up_the_round(monkeypatch):
    run = _run(monkeypatch, shards=[0], k=1)
    a, b = cpu_worker(), cpu_worker()
    first = services.task_claim(worker=a)
    data, metrics = train_update(task_json(first))
    services.task_submit_result(task_id=first.pk, worker=a, data=data, metrics=metrics)
    rnd = Round.objects.get(run=run)
    assert _round_ready(rnd, timezone.now())  # nobody took the replica: nothing to wait for
    replica = services.task_claim(worker=b)
    assert replica.replica_of_id == first.pk
    assert not _round_ready(rnd, timezone.now())  # being trained: worth waiting for ...
    assert _round_ready(rnd, rnd.deadline + timedelta(seconds=1))  # ... until the round's deadline
    Round.objects.filter(pk=rnd.pk).update(deadline=timezone.now() - timedelta(seconds=1))
    rnd = services.round_aggregate(round_id=rnd.pk)
    assert rnd is not None and rnd.accepted, rnd.reason
    assert Task.objects.get(pk=first.pk).status == Task.Status.ACCEPTED
    assert Task.objects.get(pk=replica.pk).status == Task.Status.EXPIRED


def test_the_run_page_and_api_show_spot_checks_once_the_round_is_aggregated(monkeypatch, client):
    from django.urls import reverse

    run = _run(monkeypatch, shards=[0], k=1)
    a, b = cpu_worker(), cpu_worker()
    first, replica = services.task_claim(worker=a), services.task_claim(worker=b)
    api = reverse("api-run-detail", args=[run.pk])
    listed = [t["id"] for t in client.get(api).json()["rounds"][0]["tasks"]]
    assert listed == [first.pk]  # while the round is open, nobody can tell which shard is checked
    for task, worker in ((first, a), (replica, b)):
        data, metrics = train_update(task_json(task))
        services.task_submit_result(task_id=task.pk, worker=worker, data=data, metrics=metrics)
    assert services.round_aggregate(round_id=Round.objects.get(run=run).pk).accepted
    tasks = {t["id"]: t for t in client.get(api).json()["rounds"][0]["tasks"]}
    assert tasks[replica.pk]["replica_of"] == first.pk and tasks[first.pk]["replica_of"] is None
    assert tasks[replica.pk]["replica_check"]["agreed"] is True
    assert tasks[first.pk]["replica_check"]["other_task"] == replica.pk
    page = client.get(reverse("training:run_detail", args=[run.pk])).content.decode()
    assert f"task {replica.pk}: replica of task {first.pk}: agreed" in page


def test_claiming_steps_trained_ahead_does_not_dodge_the_spot_check(monkeypatch):
    """Both tasks of a checked shard start AdamW afresh, which an agent never trains ahead of, so an overlap
    run's replica that says it trained ahead is still compared with its twin and turned away when it differs."""
    run = _run(monkeypatch, shards=[0], k=3, aggregator="mean", overlap=True)
    honest, other1, other2, lazy = cpu_worker(), cpu_worker(), cpu_worker(), cpu_worker()
    tasks = [services.task_claim(worker=w) for w in (honest, other1, other2, lazy)]
    assert tasks[3].replica_of_id == tasks[0].pk and task_json(tasks[3])["optimizer"] == "fresh"
    for t, w in zip(tasks[:3], (honest, other1, other2), strict=True):
        data, metrics = train_update(task_json(t))
        services.task_submit_result(task_id=t.pk, worker=w, data=data, metrics=metrics)
    gen = torch.Generator().manual_seed(5)
    fake = {k: 0.1 * torch.randn(v.shape, generator=gen) * v.norm() / max(v.numel(), 1) ** 0.5
            for k, v in _decode(train_update(task_json(tasks[1]))[0], task_json(tasks[1])).items()}
    services.task_submit_result(task_id=tasks[3].pk, worker=lazy, data=encode_update(fake, "int8"),
                                metrics=json.loads(metrics_json(overlap_steps=4, overlap_from_round=0)))
    rnd = services.round_aggregate(round_id=Round.objects.get(run=run).pk)
    assert rnd is not None and rnd.accepted, rnd.reason
    dropped = Task.objects.get(pk=tasks[3].pk)
    assert dropped.status == Task.Status.REJECTED and dropped.credit is None, dropped.reason
    assert dropped.replica_check["agreed"] is False
    assert not CreditGrant.objects.filter(worker=lazy).exists()
