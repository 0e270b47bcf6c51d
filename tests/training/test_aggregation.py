import threading

import pytest
import torch
from django.db import connections

from diloco.checkpoint import load_weights
from diloco.codecs import decode_update
from diloco.outer import OuterOptimizer
from ledger.models import Entry
from ledger.selectors import ledger_verify
from marketplace.models import CreditGrant, Worker
from tests.marketplace.factories import WorkerFactory
from training import blobs, services
from training.models import CommunityModel, Round, Task, TrainingRun, checkpoint_storage_name
from training.services import aggregation

from .conftest import stored_files
from .factories import approved_proposal, metrics_json, random_update, train_update

pytestmark = pytest.mark.django_db


def _start(**diloco):
    return services.run_start(proposal_id=approved_proposal(diloco=diloco).pk)


def _claim_and_submit(run, workers, make):
    """Each worker claims a task of the run's open round and uploads ``make(task_json, i)``."""
    from rest_framework.test import APIRequestFactory

    request = APIRequestFactory().get("/")
    from training.serializers import task_payload

    tasks = []
    for i, worker in enumerate(workers):
        task = services.task_claim(worker=worker)
        assert task is not None
        body = task_payload(task, request=request, guardrails=[], max_upload_bytes=0)
        data, metrics = make(body, i)
        services.task_submit_result(task_id=task.pk, worker=worker, data=data, metrics=metrics)
        tasks.append(task)
    return tasks


def honest(body, i):
    return train_update(body)


def _metrics():
    import json

    return json.loads(metrics_json())


def test_round_aggregates_once_and_the_next_round_opens():
    run = _start(workers_per_round=2, rounds=2)
    workers = [WorkerFactory(gpus=[]) for _ in range(2)]
    _claim_and_submit(run, workers, honest)
    rnd = Round.objects.get(run=run, index=1)

    first = services.round_aggregate(round_id=rnd.pk)
    assert first is not None and first.status == Round.Status.DONE and first.accepted
    assert services.round_aggregate(round_id=rnd.pk) is None  # a second call changes nothing
    assert Entry.objects.filter(action="round.aggregated").count() == 1
    assert first.eval_loss_after < first.eval_loss_before
    assert Round.objects.get(run=run, index=2).status == Round.Status.OPEN
    assert Round.objects.get(run=run, index=2).checkpoint_in_id == first.checkpoint_out_id
    assert set(Task.objects.filter(round=rnd).values_list("status", flat=True)) == {Task.Status.ACCEPTED}

    entry = Entry.objects.get(action="round.aggregated")
    assert entry.payload["checkpoint"] == first.checkpoint_out_id and entry.payload["aggregator"] == "mean"
    assert sorted(a["task_id"] for a in entry.payload["accepted"]) == sorted(
        Task.objects.filter(round=rnd).values_list("pk", flat=True))
    assert all(len(a["update_sha256"]) == 64 for a in entry.payload["accepted"])


def test_not_ready_round_is_not_aggregated():
    run = _start(workers_per_round=2, min_workers=2)
    _claim_and_submit(run, [WorkerFactory(gpus=[])], honest)
    assert services.round_aggregate(round_id=Round.objects.get(run=run).pk) is None
    assert Round.objects.get(run=run).status == Round.Status.OPEN


def test_credits_and_reliability_follow_the_verdicts():
    run = _start(workers_per_round=3, rounds=1, aggregator="trimmed_mean", trim_fraction=0.34)
    workers = [WorkerFactory(gpus=[]) for _ in range(3)]
    state = blobs.checkpoint_state(run.base_checkpoint_id)[0]

    def make(body, i):
        if i == 2:  # a poisoner: a huge random update
            return random_update(state, scale=10.0, seed=9), _metrics()
        return train_update(body)

    tasks = _claim_and_submit(run, workers, make)
    rnd = services.round_aggregate(round_id=Round.objects.get(run=run).pk)
    assert rnd.accepted
    good, bad = [Task.objects.get(pk=t.pk) for t in tasks[:2]], Task.objects.get(pk=tasks[2].pk)
    assert all(t.status == Task.Status.ACCEPTED and t.credit > 0 for t in good)
    assert bad.status == Task.Status.REJECTED and "median norm" in bad.reason
    assert bad.credit is None
    assert set(CreditGrant.objects.values_list("reference", flat=True)) == {f"task:{t.pk}" for t in good}
    reliab = {w.pk: Worker.objects.get(pk=w.pk).reliability for w in workers}
    assert reliab[workers[0].pk] > 0.5 and reliab[workers[1].pk] > 0.5 and reliab[workers[2].pk] < 0.5
    payload = Entry.objects.get(action="round.aggregated").payload
    assert [r["task_id"] for r in payload["rejected"]] == [bad.pk]
    assert "median norm" in payload["rejected"][0]["reason"]
    # The run finished: its final checkpoint is the model's current version.
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.FINISHED and run.final_checkpoint_id == rnd.checkpoint_out_id
    assert CommunityModel.objects.get(pk=run.model_id).current_checkpoint_id == rnd.checkpoint_out_id
    assert Entry.objects.filter(action="run.finished").count() == 1
    # The proposal's author is told in the app that the run finished.
    from governance.models import Notification

    assert Notification.objects.filter(user_id=run.proposal.author_id, kind="run_finished").count() == 1
    assert ledger_verify().ok


def test_sign_flipped_update_is_rejected_while_honest_ones_aggregate():
    run = _start(workers_per_round=3, rounds=1, aggregator="mean")
    workers = [WorkerFactory(gpus=[]) for _ in range(3)]
    honest_bodies = []

    def make(body, i):
        data, metrics = train_update(body)
        honest_bodies.append(data)
        if i == 2:
            from diloco.codecs import encode_update

            # The flip of the honest direction (all three honest updates summed), not of this worker's own
            # update alone: few inner steps on disjoint shards leave single updates nearly orthogonal, so
            # the flip of one of them opposes the others only weakly, by a margin that varies with the seeds.
            ref = blobs.model_reference("byte-gpt", body["model"]["config"])
            decoded = [decode_update(d, ref) for d in honest_bodies]
            flipped = {k: -3 * sum(u[k] for u in decoded) / len(decoded) for k in decoded[0]}
            return encode_update(flipped, "int8"), metrics
        return data, metrics

    tasks = _claim_and_submit(run, workers, make)
    rnd = services.round_aggregate(round_id=Round.objects.get(run=run).pk)
    assert rnd.accepted
    bad = Task.objects.get(pk=tasks[2].pk)
    assert bad.status == Task.Status.REJECTED and "opposes" in bad.reason


@pytest.fixture(params=[True, False], ids=["writes-during-eval", "writes-after-eval"])
def overlap(request, monkeypatch):
    """Both ways of ordering the evaluation and the blob writes (which one runs depends on the machine)."""
    monkeypatch.setattr(aggregation, "_overlap_eval_with_writes", lambda: request.param)
    return request.param


def test_poisoned_step_is_rejected_and_the_old_checkpoint_kept(checkpoint_storage, overlap, settings):
    """Updates that agree with each other (so screening passes) but ruin the model fail evaluation."""
    settings.AGORA_SCORE_CONTRIBUTIONS = False  # the evaluation gate alone (the checks would turn these away first)
    run = _start(workers_per_round=2, rounds=2, aggregator="mean")
    state = blobs.checkpoint_state(run.base_checkpoint_id)[0]
    same = random_update(state, scale=0.5, seed=3)
    workers = [WorkerFactory(gpus=[]) for _ in range(2)]
    _claim_and_submit(run, workers, lambda body, i: (same, _metrics()))
    rnd = services.round_aggregate(round_id=Round.objects.get(run=run, index=1).pk)

    assert rnd.status == Round.Status.REJECTED and rnd.accepted is False
    assert "held-out loss rose" in rnd.reason
    assert rnd.checkpoint_out_id == rnd.checkpoint_in_id == run.base_checkpoint_id
    assert Round.objects.get(run=run, index=2).checkpoint_in_id == run.base_checkpoint_id
    run.refresh_from_db()
    assert run.outer_state_name == ""  # the momentum did not absorb the poisoned step
    assert Entry.objects.filter(action="round.rejected").count() == 1
    assert not CreditGrant.objects.exists()
    assert all(w.reliability == 0.5 for w in Worker.objects.filter(pk__in=[w.pk for w in workers]))
    # The rejected step's checkpoint and outer state, written while it was evaluated, are gone again.
    kept = stored_files(checkpoint_storage)
    assert not [name for name in kept if name.startswith("outer/")]
    checkpoints = [name for name in kept if name.endswith(".safetensors") and not name.startswith("updates")]
    assert checkpoints == [checkpoint_storage_name(run.base_checkpoint_id)], kept


@pytest.mark.parametrize("fresh_process", [True, False], ids=["caches-cleared", "same-process"])
def test_outer_optimizer_state_survives_a_restart(fresh_process, overlap):
    """Two rounds aggregated with caches cleared in between (or kept, as in one long-lived worker)
    equal two steps of one in-memory optimizer."""
    run = _start(workers_per_round=1, min_workers=1, rounds=3, aggregator="mean", outer_momentum=0.9)
    worker = WorkerFactory(gpus=[])
    base = {k: v.clone() for k, v in blobs.checkpoint_state(run.base_checkpoint_id)[0].items()}
    ref = blobs.model_reference("byte-gpt", run.spec["model"]["config"])
    deltas = []
    for index in (1, 2):
        def make(body, i, index=index):
            data, metrics = train_update(body)
            deltas.append(decode_update(data, ref))
            return data, metrics

        _claim_and_submit(run, [worker if index == 1 else WorkerFactory(gpus=[])], make)
        assert services.round_aggregate(round_id=Round.objects.get(run=run, index=index).pk).accepted
        if fresh_process:
            blobs.clear_caches()
    run.refresh_from_db()
    expected = OuterOptimizer(base, lr=0.7, momentum=0.9, nesterov=True)
    expected.step(deltas[0])
    params = expected.step(deltas[1])
    out_sha = Round.objects.get(run=run, index=2).checkpoint_out_id
    got, _ = load_weights(blobs.checkpoint_bytes(out_sha))
    for name, value in params.items():
        assert torch.equal(got[name], value), name
    saved, _ = load_weights(blobs.blob_read(run.outer_state_name))
    assert any(k.endswith(".weight") or "momentum" in k for k in saved)


def test_aggregation_after_deadline_with_min_workers():
    from datetime import timedelta

    from django.utils import timezone

    run = _start(workers_per_round=3, min_workers=2, rounds=1)
    workers = [WorkerFactory(gpus=[]) for _ in range(2)]
    _claim_and_submit(run, workers, honest)
    rnd = Round.objects.get(run=run)
    assert not services.round_check(round_id=rnd.pk)
    later = timezone.now() + timedelta(seconds=61)
    Round.objects.filter(pk=rnd.pk).update(deadline=timezone.now() - timedelta(seconds=1))
    assert services.round_check(round_id=rnd.pk, now=later)
    done = services.round_aggregate(round_id=rnd.pk)
    assert done.accepted
    assert Task.objects.filter(round=rnd, status=Task.Status.EXPIRED).count() == 1  # the unclaimed shard


@pytest.mark.django_db(transaction=True)
def test_concurrent_aggregations_commit_exactly_once():
    run = _start(workers_per_round=2, rounds=2)
    _claim_and_submit(run, [WorkerFactory(gpus=[]) for _ in range(2)], honest)
    rnd = Round.objects.get(run=run, index=1)
    barrier = threading.Barrier(4)
    results, errors = [], []

    def body():
        try:
            barrier.wait()
            for _attempt in range(50):
                try:
                    results.append(services.round_aggregate(round_id=rnd.pk))
                    break
                except Exception as exc:
                    if "locked" not in str(exc):
                        raise
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=body) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sum(r is not None for r in results) == 1
    assert Entry.objects.filter(action="round.aggregated").count() == 1
    assert Round.objects.filter(run=run).count() == 2
    assert CreditGrant.objects.count() == 2
    assert ledger_verify().ok


def test_a_dead_aggregation_is_reopened_and_a_late_finisher_commits_nothing(monkeypatch):
    from datetime import timedelta

    from django.utils import timezone

    run = _start(workers_per_round=2, rounds=2)
    _claim_and_submit(run, [WorkerFactory(gpus=[]) for _ in range(2)], honest)
    rnd = Round.objects.get(run=run, index=1)
    claimed = aggregation._round_claim_for_aggregation(round_id=rnd.pk, now=timezone.now())
    assert claimed is not None
    _, old_token, old_tasks = claimed
    # The worker that held the claim died; the tick re-opens the round after the stale timeout.
    later = timezone.now() + timedelta(seconds=services.AGGREGATION_STALE_S + 1)
    assert services.rounds_release_stale(now=later) == [rnd.pk]
    assert services.round_aggregate(round_id=rnd.pk).accepted
    # The old attempt wakes up and tries to commit: nothing happens.
    outcome = aggregation._aggregate_compute(Round.objects.select_related("run").get(pk=rnd.pk), old_token, old_tasks)
    assert aggregation._aggregate_commit(rnd.pk, old_token, outcome) is None
    assert Entry.objects.filter(action="round.aggregated").count() == 1
    assert Round.objects.filter(run=run).count() == 2


def test_with_two_updates_a_huge_one_is_caught_by_the_previous_rounds_norms():
    """The median of two norms is dragged by the attacker; the last round's accepted norms are not."""
    run = _start(workers_per_round=2, rounds=2, aggregator="mean")
    _claim_and_submit(run, [WorkerFactory(gpus=[]) for _ in range(2)], honest)
    assert services.round_aggregate(round_id=Round.objects.get(run=run, index=1).pk).accepted
    state = blobs.checkpoint_state(Round.objects.get(run=run, index=2).checkpoint_in_id)[0]

    def make(body, i):
        return (random_update(state, scale=1.0, seed=4), _metrics()) if i == 1 else train_update(body)

    tasks = _claim_and_submit(run, [WorkerFactory(gpus=[]) for _ in range(2)], make)
    rnd = services.round_aggregate(round_id=Round.objects.get(run=run, index=2).pk)
    assert rnd.accepted, (rnd.reason, list(Task.objects.filter(round=rnd).values_list("status", "reason", "update_norm")))
    bad = Task.objects.get(pk=tasks[1].pk)
    assert bad.status == Task.Status.REJECTED and "median accepted norm" in bad.reason
    assert Task.objects.get(pk=tasks[0].pk).status == Task.Status.ACCEPTED


@pytest.mark.parametrize(("precision", "threads", "expected"), [
    ("bf16", 2, True),   # a short evaluation: write alongside it
    ("fp32", 2, False),  # evaluation-bound on two cores: evaluate with both, then write
    ("fp32", 4, True),   # a core to spare
])
def test_eval_and_writes_overlap_only_where_it_pays(settings, precision, threads, expected):
    settings.AGORA_EVAL_PRECISION, settings.AGORA_TRAINING_DEVICE = precision, "cpu"
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert aggregation._overlap_eval_with_writes() is expected
        with aggregation._one_core_spared():
            assert torch.get_num_threads() == threads - 1
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
