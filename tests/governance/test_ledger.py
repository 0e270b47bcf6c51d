"""Every governance change lands in the ledger, and tampering with any of it is detected and named."""

import json
import subprocess
import sys

import pytest
from django.core.management import CommandError, call_command

from governance import services
from governance.models import Proposal
from ledger.models import Entry
from ledger.selectors import ledger_verify
from tests.factories import UserFactory
from tests.governance.factories import ProposalFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def history(member, other_member, staff):
    proposal = services.proposal_submit(author=member, kind="training", title="Run it", spec={}, open_now=True)
    services.vote_cast(proposal=proposal, voter=other_member, choice="yes")
    services.vote_cast(proposal=proposal, voter=other_member, choice="no")
    services.comment_post(proposal=proposal, author=member, body="Please vote.")
    decided = ProposalFactory(status="succeeded")
    services.proposal_approve(proposal=decided, by=staff)
    services.proposal_enact(proposal=decided, outcome={"run_id": 1})
    vetoed = ProposalFactory(status="succeeded")
    services.proposal_veto(proposal=vetoed, by=staff, reason="No.")
    draft = services.proposal_submit(author=UserFactory(), kind="guardrail", title="Filter",
                                     spec={"kind": "output_filter", "patterns": ["x"]})
    services.proposal_cancel(proposal=draft, by=draft.author)
    return proposal


def test_each_change_appends_its_entry_and_the_chain_verifies(history):
    assert list(Entry.objects.values_list("action", flat=True)) == [
        "proposal.submitted", "proposal.opened", "vote.cast", "vote.changed", "comment.posted",
        "proposal.approved", "proposal.enacted", "proposal.vetoed", "proposal.submitted", "proposal.canceled",
    ]
    assert ledger_verify().ok
    call_command("verify_ledger")


@pytest.mark.parametrize(
    ("field", "value"),
    [("payload", {"choice": "yes", "previous": None, "weight": 100}), ("actor", "someone-else"), ("hash", "f" * 64)],
)
def test_editing_a_governance_entry_is_named_by_both_verifiers(history, tmp_path, field, value):
    target = Entry.objects.filter(action="vote.cast").get()
    call_command("export_ledger", output=str(tmp_path / "good.json"))
    # The payload is stored as the text that was hashed: edit that text.
    column, stored = ("payload_json", json.dumps(value)) if field == "payload" else (field, value)
    Entry.objects.filter(pk=target.pk).update(**{column: stored})

    assert ledger_verify().broken_seq == target.seq
    with pytest.raises(CommandError, match=f"seq {target.seq}"):
        call_command("verify_ledger")

    exported = tmp_path / "ledger.json"
    call_command("export_ledger", output=str(exported))
    assert json.loads(exported.read_text())["entries"][target.seq - 1][field] == value
    broken = subprocess.run([sys.executable, "-m", "ledger.verify", str(exported)], capture_output=True, text=True)
    assert broken.returncode == 1 and f"seq {target.seq}" in broken.stdout
    good = subprocess.run([sys.executable, "-m", "ledger.verify", str(tmp_path / "good.json")],
                          capture_output=True, text=True)
    assert good.returncode == 0, good.stdout


def test_a_failed_service_leaves_no_entry(member):
    proposal = ProposalFactory(status="defeated")
    before = Entry.objects.count()
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do; what matters is nothing was written
        services.vote_cast(proposal=proposal, voter=member, choice="yes")
    assert Entry.objects.count() == before and Proposal.objects.get(pk=proposal.pk).status == "defeated"
