"""A spot-check replica nobody could take is reported as such, not as a missing upload: with k equal to the
agents in the run every agent trains a shard of its own and a replica must go to another one, so a sampled
replica waits for nobody; the run page, the API and the ledger say no other worker was free to re-compute
the shard. A replica that was claimed and never came back still "did not arrive"."""

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from ledger.models import Entry
from training import services
from training.models import Round, Task
from training.services import replicas

from .factories import approved_proposal, cpu_worker, task_json, train_update

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def no_contribution_scores(settings):
    settings.AGORA_SCORE_CONTRIBUTIONS = False  # tiny updates score too noisily; scores have their own tests


def _run(monkeypatch, *, k: int):
    """A one-round run whose round checks shard 0 (the real draw is secret and random)."""
    monkeypatch.setattr(replicas, "replica_shards", lambda run, index: [0])
    proposal = approved_proposal(diloco={"workers_per_round": k, "min_workers": 1, "rounds": 1, "inner_steps": 4,
                                         "replica_fraction": 0.5})
    return services.run_start(proposal_id=proposal.pk)




def _submit(task, worker):
    data, metrics = train_update(task_json(task))
    services.task_submit_result(task_id=task.pk, worker=worker, data=data, metrics=metrics)


def _replica_line(page: str, replica: Task) -> str:
    start = page.index(f"task {replica.pk}: replica of task")
    return page[start:page.index("</small>", start)]


def test_with_k_equal_to_the_agents_an_unclaimable_replica_is_reported_as_such(monkeypatch, client):
    run = _run(monkeypatch, k=2)
    a, b = cpu_worker(), cpu_worker()
    first, second = services.task_claim(worker=a), services.task_claim(worker=b)
    assert first.replica_of_id is None and second.replica_of_id is None
    # Each agent holds its own shard of the round: neither may take the replica.
    assert services.task_claim(worker=a) is None and services.task_claim(worker=b) is None
    _submit(first, a)
    _submit(second, b)
    rnd = services.round_aggregate(round_id=Round.objects.get(run=run).pk)
    assert rnd is not None and rnd.accepted, rnd.reason

    replica = Task.objects.get(round=rnd, replica_of__isnull=False)
    assert replica.worker_id is None and replica.status == Task.Status.EXPIRED
    assert replica.replica_check["agreed"] is None
    assert replica.replica_check["reason"] == replicas.REPLICA_UNCLAIMED
    assert replica.replica_check["first_task"] == first.pk

    page = client.get(reverse("training:run_detail", args=[run.pk])).content.decode()
    line = _replica_line(page, replica)
    assert "not re-computed: no other worker was free to take it" in line and "did not arrive" not in line

    api = client.get(reverse("api-run-detail", args=[run.pk])).json()
    listed = {t["id"]: t for t in api["rounds"][0]["tasks"]}
    assert listed[replica.pk]["worker_id"] is None
    assert listed[replica.pk]["replica_check"]["reason"] == replicas.REPLICA_UNCLAIMED

    entry = Entry.objects.get(action="round.replicas")
    assert entry.payload["sampled_shards"] == [0]
    assert entry.payload["pairs"] == [{
        "first_task": first.pk, "replica_task": replica.pk, "shard": 0, "agreed": None, "cosine": None,
        "norm_rel": None, "kept": None, "reason": replicas.REPLICA_UNCLAIMED}]
    assert not Entry.objects.filter(action="task.replica_mismatch").exists()


def test_a_replica_claimed_and_never_uploaded_still_did_not_arrive(monkeypatch, client):
    run = _run(monkeypatch, k=1)
    a, b = cpu_worker(), cpu_worker()
    first = services.task_claim(worker=a)
    replica = services.task_claim(worker=b)  # a free worker takes the spot check, then goes quiet
    assert replica.replica_of_id == first.pk
    _submit(first, a)
    Round.objects.filter(run=run).update(deadline=timezone.now() - timedelta(seconds=1))
    rnd = services.round_aggregate(round_id=Round.objects.get(run=run).pk)
    assert rnd is not None and rnd.accepted, rnd.reason
    replica.refresh_from_db()
    assert replica.worker_id == b.pk and replica.status == Task.Status.EXPIRED and replica.replica_check is None
    page = client.get(reverse("training:run_detail", args=[run.pk])).content.decode()
    assert "did not arrive" in _replica_line(page, replica)
    assert Entry.objects.get(action="round.replicas").payload["pairs"] == []


def test_a_third_agent_still_takes_the_spot_check_and_it_is_compared(monkeypatch, client):
    run = _run(monkeypatch, k=2)
    a, b, c = cpu_worker(), cpu_worker(), cpu_worker()
    tasks = [services.task_claim(worker=w) for w in (a, b, c)]
    assert tasks[2].replica_of_id == tasks[0].pk
    for task, worker in zip(tasks, (a, b, c), strict=True):
        _submit(task, worker)
    rnd = services.round_aggregate(round_id=Round.objects.get(run=run).pk)
    assert rnd is not None and rnd.accepted, rnd.reason
    replica = Task.objects.get(pk=tasks[2].pk)
    assert replica.replica_check["agreed"] is True and replica.worker_id == c.pk
    page = client.get(reverse("training:run_detail", args=[run.pk])).content.decode()
    assert _replica_line(page, replica).endswith(": agreed")
