"""Aggregation holds a lease: a dead attempt is taken over once it lapses, its files are deleted, and the
round is still aggregated exactly once whatever the old attempt does when it wakes up."""

import time
from datetime import timedelta

import pytest
from django.utils import timezone

from diloco.checkpoint import sha256_hex
from ledger.models import Entry
from ledger.selectors import ledger_verify
from marketplace.models import CreditGrant
from tests.marketplace.factories import WorkerFactory
from training import blobs, services, tasks
from training.models import Checkpoint, Round, TrainingRun, checkpoint_storage_name
from training.services import aggregation, rounds

from .conftest import stored_files
from .test_stalls import _start, _submit

pytestmark = pytest.mark.django_db


def _ready_round(*, rounds=2) -> Round:
    run = _start(workers_per_round=2, min_workers=2, rounds=rounds)
    for worker in (WorkerFactory(gpus=[]), WorkerFactory(gpus=[])):
        _submit(services.task_claim(worker=worker), worker)
    return Round.objects.get(run=run, index=1)


def _claim(rnd: Round):
    claimed = aggregation._round_claim_for_aggregation(round_id=rnd.pk, now=timezone.now())
    assert claimed is not None
    return claimed


def _lapse(rnd: Round) -> None:
    Round.objects.filter(pk=rnd.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))


def _attempt_files(rnd: Round, token: str) -> list[str]:
    return [rounds._attempt_outer_name(rnd.run_id, rnd.index, token),
            rounds._attempt_manifest_name(rnd.run_id, rnd.index, token)]


def _checkpoints_intact() -> None:
    for checkpoint in Checkpoint.objects.all():
        assert sha256_hex(blobs.blob_read(checkpoint.storage_name)) == checkpoint.sha256


def test_a_claim_holds_a_lease_that_a_check_does_not_take_while_it_runs(settings):
    settings.AGORA_AGGREGATION_LEASE_S = 30
    rnd = _ready_round()
    _claim(rnd)
    rnd.refresh_from_db()
    assert rnd.status == Round.Status.AGGREGATING
    assert timezone.now() + timedelta(seconds=25) < rnd.lease_expires_at <= timezone.now() + timedelta(seconds=30)
    assert tasks.round_check(rnd.pk) is False
    assert services.rounds_release_stale() == []
    assert Round.objects.get(pk=rnd.pk).status == Round.Status.AGGREGATING


def test_a_dead_aggregation_is_taken_over_its_files_deleted_and_the_round_aggregated_exactly_once(checkpoint_storage):
    rnd = _ready_round()
    old_round, old_token, old_tasks = _claim(rnd)
    # The old attempt computed and wrote its step (checkpoint, outer state, manifest), then its worker died.
    outcome = aggregation._aggregate_compute(old_round, old_token, old_tasks,
                                          lease=rounds._Lease(round_id=rnd.pk, token=old_token))
    assert outcome.accepted
    written = set(stored_files(checkpoint_storage))
    assert set(_attempt_files(rnd, old_token)) <= written
    assert checkpoint_storage_name(outcome.checkpoint_sha) in written

    _lapse(rnd)
    assert tasks.round_check(rnd.pk) is True  # the redelivered check takes over and aggregates

    rnd.refresh_from_db()
    assert rnd.status == Round.Status.DONE and rnd.aggregation_token != old_token
    left = set(stored_files(checkpoint_storage))
    assert not set(_attempt_files(rnd, old_token)) & left
    assert not [name for name in left if name.endswith(".files.json")]  # the new attempt's manifest went too
    restarted = Entry.objects.get(action="round.aggregation_restarted")
    assert restarted.payload["round"] == 1 and "lease lapsed" in restarted.payload["reason"]

    # The old attempt wakes up: its commit changes nothing, and its clean-up spares the committed checkpoint.
    assert aggregation._aggregate_commit(rnd.pk, old_token, outcome) is None
    rounds._attempt_files_delete(rnd.run_id, rnd.index, old_token,
                                   checkpoint=aggregation._round_closed_without(rnd.pk, old_token))
    # ... and so does one that wakes before its next phase boundary.
    assert aggregation._round_aggregate_claimed(old_round, old_token, old_tasks) is None

    assert Entry.objects.filter(action="round.aggregated").count() == 1
    assert Round.objects.filter(run_id=rnd.run_id).count() == 2
    assert CreditGrant.objects.count() == 2
    assert sorted(CreditGrant.objects.values_list("reference", flat=True)) == sorted(
        f"task:{t.pk}" for t in old_tasks)
    _checkpoints_intact()
    assert ledger_verify().ok


def test_a_checkpoint_cut_short_by_a_dead_attempt_is_deleted_by_the_taker(checkpoint_storage):
    rnd = _ready_round()
    _, old_token, _ = _claim(rnd)
    # Killed mid-write: the manifest names a checkpoint of which only a prefix reached the store.
    whole = b"x" * 4096
    sha = sha256_hex(whole)
    blobs.blob_write(rounds._attempt_manifest_name(rnd.run_id, rnd.index, old_token),
                     f'{{"checkpoint": "{sha}", "outer_state": ""}}'.encode())
    blobs.store().save(checkpoint_storage_name(sha), __import__("io").BytesIO(whole[:1000]))
    assert checkpoint_storage_name(sha) in stored_files(checkpoint_storage)

    _lapse(rnd)
    assert services.round_take_over_if_lapsed(round_id=rnd.pk) is True
    assert checkpoint_storage_name(sha) not in stored_files(checkpoint_storage)
    assert Round.objects.get(pk=rnd.pk).status == Round.Status.OPEN
    assert services.round_take_over_if_lapsed(round_id=rnd.pk) is False  # nothing left to take over


def test_the_tick_takes_over_a_lapsed_lease_and_hands_the_round_on(monkeypatch, django_capture_on_commit_callbacks):
    rnd = _ready_round()
    _claim(rnd)
    _lapse(rnd)
    sent = []
    monkeypatch.setattr(tasks.aggregate_round, "delay", sent.append)
    with django_capture_on_commit_callbacks(execute=True):
        result = tasks.tick()
    assert result["released"] == [rnd.pk] and result["ready"] == [rnd.pk]
    assert sent == [rnd.pk]
    assert tasks.aggregate_round(rnd.pk) is True
    assert Round.objects.get(pk=rnd.pk).status == Round.Status.DONE


def test_an_aggregation_that_fails_gives_the_round_back_without_its_files(monkeypatch, checkpoint_storage):
    rnd = _ready_round()
    before = set(stored_files(checkpoint_storage))

    def broken_commit(*args, **kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(aggregation, "_aggregate_commit", broken_commit)
    with pytest.raises(RuntimeError):
        services.round_aggregate(round_id=rnd.pk)
    rnd.refresh_from_db()
    assert rnd.status == Round.Status.OPEN and rnd.aggregation_token == "" and rnd.lease_expires_at is None
    assert set(stored_files(checkpoint_storage)) == before
    assert "error" in Entry.objects.get(action="round.aggregation_restarted").payload["reason"]


def test_a_run_canceled_while_aggregating_closes_the_round_and_the_attempt_leaves_no_files(staff, checkpoint_storage):
    rnd = _ready_round()
    before = set(stored_files(checkpoint_storage))
    claimed = _claim(rnd)
    services.run_cancel(run_id=rnd.run_id, by=staff, reason="Stop.")
    rnd.refresh_from_db()
    assert rnd.status == Round.Status.CANCELED and rnd.aggregation_token == ""
    assert aggregation._round_aggregate_claimed(*claimed) is None
    assert set(stored_files(checkpoint_storage)) == before
    assert TrainingRun.objects.get(pk=rnd.run_id).status == TrainingRun.Status.CANCELED
    assert not Entry.objects.filter(action="round.aggregated").exists()
    assert Entry.objects.get(action="round.canceled").payload["was"] == "aggregating"


@pytest.mark.django_db(transaction=True)
def test_the_keep_alive_thread_renews_the_lease_while_a_phase_runs(settings):
    settings.AGORA_AGGREGATION_LEASE_S = 3  # renewed every second
    rnd = _ready_round()
    _, token, _ = _claim(rnd)
    first = Round.objects.get(pk=rnd.pk).lease_expires_at
    lease = rounds._Lease(round_id=rnd.pk, token=token)
    with lease.kept():
        for _ in range(100):  # a long phase: wait (up to 10 s) until the thread has renewed
            if Round.objects.get(pk=rnd.pk).lease_expires_at > first:
                break
            time.sleep(0.1)
    assert Round.objects.get(pk=rnd.pk).lease_expires_at > first
    Round.objects.filter(pk=rnd.pk).update(aggregation_token="someone-else")
    with pytest.raises(rounds._LeaseLost):
        lease.renew()


def test_a_broker_outage_never_fails_the_caller(caplog, monkeypatch, django_capture_on_commit_callbacks):
    from training.receivers import on_training_proposal_approved

    def broker_down(*args):
        raise ConnectionError("broker down")

    monkeypatch.setattr(tasks.round_check, "delay", broker_down)
    monkeypatch.setattr(tasks.start_run, "delay", broker_down)
    assert tasks.enqueue(tasks.round_check, 1) is False
    assert "next tick will catch up" in caplog.text
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        on_training_proposal_approved(sender=None, proposal_id=123)  # an approval still commits
    assert len(callbacks) == 1
