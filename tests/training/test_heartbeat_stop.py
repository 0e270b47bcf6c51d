"""A heartbeat naming a task tells the agent to stop when that task is no longer wanted from it."""

import re
from datetime import UTC, datetime, timedelta

import pytest
from django.core.cache import cache
from django.utils import timezone

from marketplace import tasks_liveness
from tests.marketplace.factories import WorkerFactory
from training import services
from training.models import Round, Task, TrainingRun

from .conftest import client_for
from .factories import approved_proposal
from .test_stalls import _submit

# Markers are written after commit, so these tests commit.
pytestmark = pytest.mark.django_db(transaction=True)

HEARTBEAT = "/api/v1/workers/heartbeat"


def _beat(worker, task_id=None) -> dict:
    response = client_for(worker).post(HEARTBEAT, {"state": "busy" if task_id else "idle", "task_id": task_id},
                                       format="json")
    assert response.status_code == 200, response.content
    return response.json()


def _forget_markers(*task_ids) -> None:
    """As if the cache had been flushed: the answer must then come from the database."""
    for task_id in task_ids:
        cache.delete(f"{tasks_liveness.MARKER_PREFIX}{task_id}")


@pytest.fixture
def run():
    return services.run_start(proposal_id=approved_proposal(diloco={"workers_per_round": 2, "rounds": 2}).pk)


@pytest.fixture
def worker():
    return WorkerFactory(gpus=[])


def _claimed(worker) -> Task:
    return services.task_claim(worker=worker)


def test_every_reply_carries_the_server_time_in_utc_with_milliseconds(worker):
    before = timezone.now()
    reply = _beat(worker)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", reply["server_time"])
    server_time = datetime.fromisoformat(reply["server_time"])
    assert server_time.tzinfo is not None and server_time.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= server_time.astimezone(UTC) <= timezone.now()
    assert reply["stop_task"] is False and "stop_reason" not in reply


@pytest.mark.parametrize("warm", [True, False], ids=["marker", "database"])
def test_a_live_task_is_not_stopped(run, worker, warm):
    task = _claimed(worker)
    if not warm:
        _forget_markers(task.pk)
    assert _beat(worker, task.pk)["stop_task"] is False
    # A task with its result in stays live until its round is aggregated.
    _submit(task, worker)
    if not warm:
        _forget_markers(task.pk)
    assert _beat(worker, task.pk)["stop_task"] is False


def _expired(run, worker):
    task = _claimed(worker)
    rnd = Round.objects.get(run=run)
    services.round_expire_late_tasks(round_id=rnd.pk, now=task.deadline + timedelta(seconds=1))
    return task, "expired"


def _failed(run, worker):
    task = _claimed(worker)
    services.task_fail(task_id=task.pk, worker=worker, reason="out of memory")
    return task, "reported failed"


def _canceled(run, worker):
    from tests.factories import UserFactory

    task = _claimed(worker)
    services.run_cancel(run_id=run.pk, by=UserFactory(is_staff=True), reason="Licence withdrawn.")
    return task, "canceled"


def _aggregated(run, worker):
    """The round was aggregated with the other worker's result; this one was still training."""
    task = _claimed(worker)
    other = WorkerFactory(gpus=[])
    _submit(_claimed(other), other)
    rnd = Round.objects.get(run=run, index=1)
    Round.objects.filter(pk=rnd.pk).update(deadline=timezone.now() - timedelta(seconds=1))
    assert services.round_aggregate(round_id=rnd.pk) is not None
    return task, "aggregated"


def _deadline_passed(run, worker):
    """The deadline passed and no sweep has expired the task yet: the marker alone says stop."""
    task = _claimed(worker)
    Task.objects.filter(pk=task.pk).update(deadline=timezone.now() - timedelta(seconds=1))
    tasks_liveness.mark_live(task_id=task.pk, worker_id=worker.pk, deadline=timezone.now().timestamp() - 1)
    return task, "deadline passed"


def _run_failed(run, worker):
    task = _claimed(worker)
    Task.objects.filter(pk=task.pk).update(deadline=timezone.now() + timedelta(hours=1))  # still training
    Round.objects.filter(run=run).update(extensions=99)
    TrainingRun.objects.filter(pk=run.pk).update(failed_rounds=99)
    rnd = Round.objects.get(run=run)
    services.round_check(round_id=rnd.pk, now=rnd.deadline + timedelta(seconds=1))
    assert TrainingRun.objects.get(pk=run.pk).status == TrainingRun.Status.FAILED
    return task, "failed"


@pytest.mark.parametrize("warm", [True, False], ids=["marker", "database"])
@pytest.mark.parametrize("case", [_expired, _failed, _canceled, _aggregated, _deadline_passed, _run_failed],
                         ids=lambda f: f.__name__.strip("_"))
def test_a_task_no_longer_wanted_is_stopped_with_the_reason(run, worker, case, warm):
    task, words = case(run, worker)
    if not warm:
        _forget_markers(task.pk)
    reply = _beat(worker, task.pk)
    assert reply["stop_task"] is True
    assert words in reply["stop_reason"]


@pytest.mark.parametrize("warm", [True, False], ids=["marker", "database"])
def test_someone_elses_task_or_no_task_is_not_yours(run, worker, warm):
    task = _claimed(worker)
    intruder = WorkerFactory(gpus=[])
    pending = Task.objects.filter(round__run=run, status=Task.Status.PENDING).get()
    if not warm:
        _forget_markers(task.pk, pending.pk)
    for task_id in (task.pk, pending.pk, 987654321, 2**63 - 1):
        reply = _beat(intruder, task_id)
        assert reply["stop_task"] is True and "not assigned to this worker" in reply["stop_reason"], task_id
    assert _beat(worker, task.pk)["stop_task"] is False  # the owner is not disturbed


def test_a_warm_stop_answer_costs_no_query(run, worker, django_assert_num_queries):
    task = _claimed(worker)
    services.task_fail(task_id=task.pk, worker=worker, reason="x")
    _beat(worker)  # warms the token cache
    with django_assert_num_queries(0):
        assert client_for(worker).post(HEARTBEAT, {"state": "busy", "task_id": task.pk},
                                       format="json").json()["stop_task"] is True


def test_without_a_marker_the_database_answers_once_and_the_marker_is_written_back(
        run, worker, django_assert_num_queries):
    task = _claimed(worker)
    _forget_markers(task.pk)
    _beat(worker)
    with django_assert_num_queries(1):
        assert _beat(worker, task.pk)["stop_task"] is False
    with django_assert_num_queries(0):
        assert _beat(worker, task.pk)["stop_task"] is False


def test_a_cache_outage_falls_back_to_the_database(run, worker, monkeypatch):
    task = _claimed(worker)
    services.task_fail(task_id=task.pk, worker=worker, reason="x")

    def down(*args, **kwargs):
        raise ConnectionError("cache down")

    monkeypatch.setattr(tasks_liveness.presence, "fast_redis", down)
    monkeypatch.setattr(tasks_liveness.cache, "get", down)
    monkeypatch.setattr(tasks_liveness.cache, "add", down)
    assert tasks_liveness.stop_reason(task_id=task.pk, worker_id=worker.pk) == "the task was reported failed"


def test_a_stale_live_marker_written_back_never_overwrites_a_newer_stop(run, worker):
    task = _claimed(worker)
    services.task_fail(task_id=task.pk, worker=worker, reason="x")
    # The database hook read the task while it was still live and writes back after the stop was marked.
    tasks_liveness.remember(task_id=task.pk, worker_id=worker.pk, deadline=None, stop=None)
    assert tasks_liveness.stop_reason(task_id=task.pk, worker_id=worker.pk) == "the task was reported failed"


def test_while_the_round_is_aggregated_an_unfinished_task_is_stopped_and_a_finished_one_is_not(run, worker):
    training = _claimed(worker)
    finished_by = WorkerFactory(gpus=[])
    finished = _claimed(finished_by)
    _submit(finished, finished_by)
    rnd = Round.objects.get(run=run, index=1)
    Round.objects.filter(pk=rnd.pk).update(status=Round.Status.AGGREGATING, aggregation_token="t",
                                           lease_expires_at=timezone.now() + timedelta(seconds=30))
    _forget_markers(training.pk, finished.pk)
    reply = _beat(worker, training.pk)
    assert reply["stop_task"] is True and "being aggregated" in reply["stop_reason"]
    assert _beat(finished_by, finished.pk)["stop_task"] is False
    # Not remembered: if this aggregation fails and the round re-opens, the task is wanted again.
    Round.objects.filter(pk=rnd.pk).update(status=Round.Status.OPEN, aggregation_token="", lease_expires_at=None)
    assert _beat(worker, training.pk)["stop_task"] is False
