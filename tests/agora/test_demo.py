"""`make run` seeds a demo; it must produce what the README promises, and be safe to run twice."""

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command

from governance.eligibility import voter_eligibility
from governance.models import Guardrail, Proposal
from ledger.selectors import ledger_verify
from training.models import CommunityModel, TrainingRun


@pytest.mark.django_db(transaction=True)
def test_seed_demo_creates_members_proposals_a_guardrail_and_a_run(settings):
    settings.CELERY_TASK_ALWAYS_EAGER = True  # the approval's on-commit pickup runs in-process
    call_command("seed_demo")
    users = get_user_model().objects
    assert users.get(username="admin").is_staff
    assert users.get(username="alice").check_password("agora-demo")
    for name in ("admin", "alice", "bob", "carol", "dave"):  # verified and old enough: all may vote
        assert voter_eligibility(users.get(username=name)).eligible, name
    assert Guardrail.objects.filter(active=True, kind="output_filter").exists()
    assert Proposal.objects.filter(status=Proposal.Status.ACTIVE).count() == 2
    assert Proposal.objects.filter(status=Proposal.Status.DRAFT).count() == 1
    assert Proposal.objects.filter(status=Proposal.Status.SUCCEEDED).count() == 2  # waiting for staff
    run = TrainingRun.objects.get()
    assert run.proposal.status == Proposal.Status.ENACTED
    assert CommunityModel.objects.get(slug="byte-gpt-demo").current_checkpoint is not None
    assert ledger_verify().ok

    call_command("seed_demo")  # a second run changes nothing
    assert TrainingRun.objects.count() == 1 and Proposal.objects.count() == 7
