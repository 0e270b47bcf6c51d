import pytest

from governance.models import Proposal
from ledger.models import Entry
from training import services
from training.models import CommunityModel, Round, Task, TrainingRun

from .factories import TINY_CONFIG, approved_proposal

pytestmark = pytest.mark.django_db


def test_approved_proposal_becomes_a_run_with_its_first_round_open():
    proposal = approved_proposal()
    run = services.run_start(proposal_id=proposal.pk)

    assert run.status == TrainingRun.Status.RUNNING and run.current_round == 1 and run.total_rounds == 2
    proposal.refresh_from_db()
    assert proposal.status == Proposal.Status.ENACTED and proposal.outcome == {"run_id": run.pk}
    model = CommunityModel.objects.get(slug="tiny-gpt")
    assert model.config == TINY_CONFIG and run.model == model
    rnd = Round.objects.get(run=run)
    assert rnd.index == 1 and rnd.status == Round.Status.OPEN and rnd.checkpoint_in == run.base_checkpoint
    tasks = list(Task.objects.filter(round=rnd))
    assert sorted(t.shard_index for t in tasks) == [0, 1]
    assert all(t.status == Task.Status.PENDING and t.worker is None for t in tasks)
    actions = list(Entry.objects.values_list("action", flat=True))
    assert {"run.created", "proposal.enacted", "round.opened", "model.created"} <= set(actions)


def test_run_start_is_idempotent_and_ignores_unapproved_proposals():
    proposal = approved_proposal()
    first = services.run_start(proposal_id=proposal.pk)
    assert services.run_start(proposal_id=proposal.pk) == first
    assert TrainingRun.objects.count() == 1 and Round.objects.count() == 1

    draft = approved_proposal()
    Proposal.objects.filter(pk=draft.pk).update(status=Proposal.Status.SUCCEEDED)
    assert services.run_start(proposal_id=draft.pk) is None
    assert TrainingRun.objects.count() == 1


def test_tick_picks_up_every_approved_proposal():
    a, b = approved_proposal(), approved_proposal(model={"name": "other-gpt"})
    started = services.runs_start_approved()
    assert sorted(started) == sorted(TrainingRun.objects.values_list("pk", flat=True))
    assert set(TrainingRun.objects.values_list("proposal_id", flat=True)) == {a.pk, b.pk}
    assert services.runs_start_approved() == []


def test_init_current_starts_from_the_models_current_checkpoint():
    model = services.community_model_ensure(slug="tiny-gpt", name="Tiny", arch="byte-gpt", config=TINY_CONFIG, seed=987_654)
    run = services.run_start(proposal_id=approved_proposal(model={"init": "current"}).pk)
    assert run.base_checkpoint_id == model.current_checkpoint_id

    scratch = services.run_start(proposal_id=approved_proposal(model={"init": "scratch"}).pk)
    assert scratch.base_checkpoint_id != model.current_checkpoint_id


def test_community_model_ensure_is_idempotent_and_content_addressed(checkpoint_storage):
    a = services.community_model_ensure(slug="demo", name="Demo", arch="byte-gpt", config=TINY_CONFIG, seed=1)
    b = services.community_model_ensure(slug="demo", name="Demo", arch="byte-gpt", config=TINY_CONFIG, seed=1)
    assert a.pk == b.pk and a.current_checkpoint_id == b.current_checkpoint_id
    sha = a.current_checkpoint_id
    assert (checkpoint_storage / sha[:2] / f"{sha}.safetensors").exists()


def test_approval_signal_enqueues_the_pickup(django_capture_on_commit_callbacks, monkeypatch):
    from governance.signals import training_proposal_approved
    from training import tasks

    sent = []
    monkeypatch.setattr(tasks.start_run, "delay", lambda pid: sent.append(pid))
    with django_capture_on_commit_callbacks(execute=True):
        training_proposal_approved.send(sender=Proposal, proposal_id=42)
    assert sent == [42]


def test_celery_worker_processes_warm_up_at_start(monkeypatch):
    import weakref

    from celery.signals import worker_process_init

    from training import tasks

    receivers = [r() if isinstance(r, weakref.ReferenceType) else r for _, r in worker_process_init.receivers]
    assert tasks._warm_up_worker_process in receivers
    calls = []
    monkeypatch.setattr(tasks, "warm_up", lambda: calls.append("warm"))
    tasks._warm_up_worker_process()
    assert calls == ["warm"]
