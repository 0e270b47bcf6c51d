"""Canceling a training run: staff only, with a public reason, from pending or running; the run then stops."""

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from ledger.models import Entry
from tests.factories import UserFactory
from tests.marketplace.factories import WorkerFactory
from training import services
from training.errors import TaskExpired
from training.models import Round, Task, TrainingRun
from training.services import aggregation

from .factories import approved_proposal, train_update

pytestmark = pytest.mark.django_db

ROLES = ["anonymous", "member", "proposer", "staff"]
STATES = ["pending", "running", "finished", "failed", "canceled"]
# 401: not logged in; 403: role may not; 409: the run is past canceling.
EXPECTED = {
    "anonymous": dict.fromkeys(STATES, 401),
    "member": dict.fromkeys(STATES, 403),
    "proposer": dict.fromkeys(STATES, 403),  # proposing a run does not make it yours to stop
    "staff": {s: 200 if s in ("pending", "running") else 409 for s in STATES},
}


def _run(state: str = "running") -> TrainingRun:
    run = services.run_start(proposal_id=approved_proposal().pk)
    if state != "running":
        final = run.base_checkpoint if state == "finished" else None
        TrainingRun.objects.filter(pk=run.pk).update(status=state, final_checkpoint=final)
        run.refresh_from_db()
    return run


def _snapshot(run: TrainingRun) -> tuple:
    run.refresh_from_db()
    return (run.status, run.reason, run.finished_at, sorted(Task.objects.filter(round__run=run)
                                                             .values_list("id", "status")), Entry.objects.count())


@pytest.mark.parametrize(("role", "state", "expected"),
                         [pytest.param(r, s, EXPECTED[r][s], id=f"{r}-{s}") for r in ROLES for s in STATES])
def test_cancel_permission_matrix(role, state, expected):
    run = _run(state)
    client = APIClient()
    if role != "anonymous":
        user = {"member": UserFactory, "proposer": lambda: run.proposal.author,
                "staff": lambda: UserFactory(is_staff=True)}[role]()
        client.force_authenticate(user)
    before = _snapshot(run)

    response = client.post(f"/api/v1/runs/{run.pk}/cancel", {"reason": "Data licence withdrawn."}, format="json")

    assert response.status_code == expected, response.content
    if expected >= 400:
        assert response.json()["error"]
        assert _snapshot(run) == before
    else:
        assert response.json()["status"] == "canceled"
        run.refresh_from_db()
        assert run.status == TrainingRun.Status.CANCELED and run.reason == "Data licence withdrawn."
        entry = Entry.objects.filter(action="run.canceled").get()
        assert entry.payload == {"reason": "Data licence withdrawn."}
        closed = Entry.objects.filter(action="round.canceled").get()
        assert closed.seq > entry.seq and closed.payload["round"] == 1


@pytest.mark.parametrize("reason", ["", "   ", "x" * 2001])
def test_cancel_needs_a_reason_and_changes_nothing_without_one(staff_client, reason):
    run = _run()
    before = _snapshot(run)
    response = staff_client.post(f"/api/v1/runs/{run.pk}/cancel", {"reason": reason}, format="json")
    assert response.status_code == 400
    assert "reason" in response.json()["fields"]
    assert _snapshot(run) == before


def test_a_canceled_run_hands_out_no_work_and_refuses_uploads(staff):
    run = _run()
    worker, late = WorkerFactory(gpus=[]), WorkerFactory(gpus=[])
    task = services.task_claim(worker=worker)
    assert task is not None

    services.run_cancel(run_id=run.pk, by=staff, reason="Stop.")

    assert services.task_claim(worker=late) is None
    assert not Task.objects.filter(round__run=run, status__in=[Task.Status.PENDING, Task.Status.ASSIGNED]).exists()
    with pytest.raises(TaskExpired):
        services.task_submit_result(task_id=task.pk, worker=worker, data=b"x", metrics={})


def test_an_aggregation_under_way_when_the_run_is_canceled_commits_nothing(staff):
    """Cancel lands between the claim of a round and the commit of its aggregate."""
    from rest_framework.test import APIRequestFactory

    from training.serializers import task_payload

    run = services.run_start(proposal_id=approved_proposal(diloco={"workers_per_round": 1, "rounds": 2}).pk)
    worker = WorkerFactory(gpus=[])
    task = services.task_claim(worker=worker)
    body = task_payload(task, request=APIRequestFactory().get("/"), guardrails=[], max_upload_bytes=0)
    data, metrics = train_update(body)
    services.task_submit_result(task_id=task.pk, worker=worker, data=data, metrics=metrics)
    rnd = Round.objects.get(run=run, index=1)
    claimed = aggregation._round_claim_for_aggregation(round_id=rnd.pk, now=timezone.now())
    assert claimed is not None
    outcome = aggregation._aggregate_compute(*claimed)
    assert outcome.accepted

    services.run_cancel(run_id=run.pk, by=staff, reason="Stop.")
    assert aggregation._aggregate_commit(rnd.pk, claimed[1], outcome) is None

    run.refresh_from_db()
    assert run.status == TrainingRun.Status.CANCELED
    assert not Round.objects.filter(run=run, index=2).exists()
    assert not Entry.objects.filter(action="round.aggregated").exists()


def test_run_page_offers_cancel_to_staff_only(client, staff):
    run = _run()
    member = UserFactory()
    client.force_login(member)
    page = client.get(f"/runs/{run.pk}/").content.decode()
    assert "Cancel this run" not in page
    assert client.post(f"/runs/{run.pk}/cancel", {"reason": "no"}).status_code == 403
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.RUNNING

    client.force_login(staff)
    assert "Cancel this run" in client.get(f"/runs/{run.pk}/").content.decode()
    response = client.post(f"/runs/{run.pk}/cancel", {"reason": ""}, follow=True)
    assert "needs a reason" in response.content.decode()
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.RUNNING

    response = client.post(f"/runs/{run.pk}/cancel", {"reason": "Compute is needed elsewhere."}, follow=True)
    page = response.content.decode()
    assert "Run canceled" in page and "Compute is needed elsewhere." in page
    assert "Cancel this run" not in page  # nothing left to cancel
    run.refresh_from_db()
    assert run.status == TrainingRun.Status.CANCELED


def test_anonymous_cancel_on_the_web_goes_to_login(client):
    run = _run()
    response = client.post(f"/runs/{run.pk}/cancel", {"reason": "x"})
    assert response.status_code == 302 and "/login" in response["Location"]


def test_canceling_a_run_that_does_not_exist_is_404(client, staff_client, staff):
    assert staff_client.post("/api/v1/runs/999/cancel", {"reason": "x"}, format="json").status_code == 404
    client.force_login(staff)
    assert client.post("/runs/999/cancel", {"reason": "x"}).status_code == 404
