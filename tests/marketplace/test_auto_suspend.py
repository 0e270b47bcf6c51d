"""A worker whose reliability falls under AGORA_SUSPEND_BELOW_RELIABILITY is suspended automatically, with the
reason in the ledger; a good record, too few results, or the feature turned off keep it active."""

import pytest

from ledger.models import Entry
from ledger.selectors import ledger_verify
from marketplace.errors import WorkerSuspended
from marketplace.models import Worker
from marketplace.services import worker_record_outcome, worker_reinstate
from tests.marketplace.factories import WorkerFactory


def _fail(worker, n, start=0):
    for i in range(start, start + n):
        worker = worker_record_outcome(worker=worker, valid=False, reference=f"task:{i}")
    return worker


def test_a_worker_that_keeps_failing_is_suspended_with_the_reason_in_the_ledger(worker, worker_client, settings):
    settings.AGORA_SUSPEND_BELOW_RELIABILITY, settings.AGORA_SUSPEND_AFTER_TASKS = 0.2, 5
    # 0.5 * 0.9^8 = 0.215 stays above 0.2; the ninth invalid result takes it to 0.194.
    worker = _fail(worker, 8)
    assert worker.status == Worker.Status.ACTIVE
    assert not Entry.objects.filter(action="worker.suspended").exists()
    worker = _fail(worker, 1, start=8)
    assert worker.status == Worker.Status.SUSPENDED
    stored = Worker.objects.get(pk=worker.pk)
    assert stored.status == Worker.Status.SUSPENDED and "automatically" in stored.status_reason
    entry = Entry.objects.get(action="worker.suspended")
    assert entry.actor == "system" and entry.subject == f"worker:{worker.pk}"
    assert entry.payload["automatic"] is True and entry.payload["tasks_invalid"] == 9
    assert entry.payload["reliability"] == pytest.approx(0.5 * 0.9 ** 9, abs=1e-6)
    assert "fell under 0.2" in entry.payload["reason"]
    assert ledger_verify().ok
    # The suspended worker's token stops working at once.
    response = worker_client.post("/api/v1/tasks/claim")
    assert response.status_code == 403 and response.json()["error"] == WorkerSuspended.code
    # Further failures record reliability but do not suspend twice.
    _fail(worker, 2, start=9)
    assert Entry.objects.filter(action="worker.suspended").count() == 1


def test_too_few_results_do_not_suspend(worker, settings):
    settings.AGORA_SUSPEND_BELOW_RELIABILITY, settings.AGORA_SUSPEND_AFTER_TASKS = 0.45, 3
    worker = _fail(worker, 2)  # reliability 0.405 < 0.45, but only two results
    assert worker.status == Worker.Status.ACTIVE
    worker = _fail(worker, 1, start=2)
    assert worker.status == Worker.Status.SUSPENDED


def test_a_reliable_worker_with_a_bad_result_stays_active(worker, settings):
    settings.AGORA_SUSPEND_BELOW_RELIABILITY, settings.AGORA_SUSPEND_AFTER_TASKS = 0.2, 5
    for i in range(10):
        worker = worker_record_outcome(worker=worker, valid=True, reference=f"task:{i}")
    worker = _fail(worker, 3, start=10)
    assert worker.status == Worker.Status.ACTIVE and worker.reliability > 0.5


def test_zero_turns_automatic_suspension_off(worker, settings):
    settings.AGORA_SUSPEND_BELOW_RELIABILITY = 0
    worker = _fail(worker, 30)
    assert worker.status == Worker.Status.ACTIVE


def test_a_reinstated_worker_is_suspended_again_only_by_a_new_failure(worker, staff, settings):
    settings.AGORA_SUSPEND_BELOW_RELIABILITY, settings.AGORA_SUSPEND_AFTER_TASKS = 0.2, 5
    worker = _fail(worker, 9)
    worker_reinstate(worker=worker, by=staff)
    assert Worker.objects.get(pk=worker.pk).status == Worker.Status.ACTIVE
    _fail(worker, 1, start=8)  # the same reference again: not a new result
    assert Worker.objects.get(pk=worker.pk).status == Worker.Status.ACTIVE
    _fail(worker, 1, start=9)
    assert Worker.objects.get(pk=worker.pk).status == Worker.Status.SUSPENDED
    assert [e.payload["automatic"] for e in Entry.objects.filter(action="worker.suspended")] == [True, True]


def test_revoked_workers_are_left_alone(member, settings):
    settings.AGORA_SUSPEND_BELOW_RELIABILITY = 0.2
    worker = WorkerFactory(owner=member, status=Worker.Status.REVOKED)
    worker = _fail(worker, 12)
    assert Worker.objects.get(pk=worker.pk).status == Worker.Status.REVOKED
