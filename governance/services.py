"""Every write of governance. Each service checks the current state, changes it and appends the ledger
entry in the same transaction."""

from __future__ import annotations

import logging
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from rest_framework import serializers

from governance.eligibility import eligible_voters, parse_rule, proposal_voter_eligibility, quorum_for
from governance.errors import NotAllowed, NotEligible, ProposalStateError, VotingClosed
from governance.models import Comment, Guardrail, Proposal, Vote, VoterApproval
from governance.selectors import number, proposal_tally
from governance.signals import training_proposal_approved
from governance.specs import content_hash, spec_normalise
from governance.weights import vote_weight
from ledger.services import entry_append

logger = logging.getLogger(__name__)
Status = Proposal.Status

MAX_TITLE = 200
MAX_BODY = 20_000
MAX_COMMENT = 5_000
MAX_REASON = 2_000


def _locked(proposal: Proposal) -> Proposal:
    """Re-read the row under a lock so concurrent votes, closes and decisions queue up."""
    return Proposal.objects.select_for_update().get(pk=proposal.pk)


def _refresh_into(target: Proposal, source: Proposal) -> Proposal:
    for field in Proposal._meta.concrete_fields:
        setattr(target, field.attname, getattr(source, field.attname))
    return target


def _require_member(user) -> None:
    if user is None or not user.is_authenticated:
        raise NotAllowed("log in first")


def _check_text(*, title: str, body: str) -> tuple[str, str]:
    title = (title or "").strip()
    errors = {}
    if len(title) < 3:
        errors["title"] = ["At least 3 characters."]
    elif len(title) > MAX_TITLE:
        errors["title"] = [f"At most {MAX_TITLE} characters."]
    if len(body or "") > MAX_BODY:
        errors["body"] = [f"At most {MAX_BODY} characters."]
    if errors:
        raise serializers.ValidationError(errors)
    return title, body or ""


def _check_retire_target(spec: dict) -> None:
    if spec.get("action") == "retire" and not Guardrail.objects.filter(pk=spec["guardrail_id"], active=True).exists():
        raise serializers.ValidationError(
            {"spec": {"guardrail_id": [f"There is no guardrail #{spec['guardrail_id']} in force."]}}
        )


@transaction.atomic
def proposal_submit(
    *, author, kind: str, title: str, body: str = "", spec: dict, open_now: bool = False
) -> Proposal:
    """Validate and freeze the spec, store the proposal as a draft and, if asked, open the vote at once.

    Raises DRF ``ValidationError`` nested like the input (``spec.diloco.inner_lr``) and stores nothing.
    """
    _require_member(author)
    title, body = _check_text(title=title, body=body)
    frozen = spec_normalise(kind=kind, spec=spec)
    if kind == Proposal.Kind.GUARDRAIL:
        _check_retire_target(frozen)
    proposal = Proposal.objects.create(
        kind=kind,
        title=title,
        body=body,
        author=author,
        spec=frozen,
        content_hash=content_hash(frozen),
        created_at=timezone.now(),
    )
    entry_append(
        actor=author,
        action="proposal.submitted",
        subject=proposal.ledger_subject,
        payload={"kind": kind, "title": title, "content_hash": proposal.content_hash, "spec": frozen},
    )
    if open_now:
        proposal_open(proposal=proposal, by=author)
    return proposal


@transaction.atomic
def proposal_open(*, proposal: Proposal, by) -> Proposal:
    """draft -> active: the window, threshold and voter eligibility rule in force now are frozen onto the
    proposal, with the number of members eligible at this moment and the quorum, a fraction of them."""
    _require_member(by)
    locked = _locked(proposal)
    if locked.author_id != by.pk:
        raise NotAllowed("only the author can open a proposal for voting")
    if locked.status != Status.DRAFT:
        raise ProposalStateError(f"only a draft can be opened, not a proposal that is {locked.status}")
    now = timezone.now()
    locked.status = Status.ACTIVE
    locked.opens_at = now
    locked.closes_at = now + settings.AGORA_VOTING_PERIOD
    locked.eligibility_rule = str(parse_rule(settings.AGORA_VOTER_ELIGIBILITY))
    locked.eligible_voters = eligible_voters(rule=locked.eligibility_rule, at=now).count()
    locked.quorum = quorum_for(eligible=locked.eligible_voters)
    locked.threshold = Decimal(str(settings.AGORA_PASS_THRESHOLD))
    locked.save(
        update_fields=["status", "opens_at", "closes_at", "quorum", "threshold", "eligibility_rule", "eligible_voters"]
    )
    entry_append(
        actor=by,
        action="proposal.opened",
        subject=locked.ledger_subject,
        payload={
            "opens_at": locked.opens_at.isoformat(),
            "closes_at": locked.closes_at.isoformat(),
            "quorum": number(locked.quorum),
            "threshold": number(locked.threshold),
            "eligibility_rule": locked.eligibility_rule,
            "eligible_voters": locked.eligible_voters,
            "quorum_fraction": str(settings.AGORA_QUORUM_FRACTION),
            "quorum_min": int(settings.AGORA_QUORUM_MIN),
        },
    )
    return _refresh_into(proposal, locked)


@transaction.atomic
def proposal_cancel(*, proposal: Proposal, by) -> Proposal:
    """The author withdraws a draft, or an active proposal nobody has voted on yet."""
    _require_member(by)
    locked = _locked(proposal)
    if locked.author_id != by.pk:
        raise NotAllowed("only the author can cancel a proposal")
    if locked.status == Status.ACTIVE:
        if locked.votes.exists():
            raise ProposalStateError("votes have been cast; an active proposal can only be canceled before any vote")
    elif locked.status != Status.DRAFT:
        raise ProposalStateError(f"a proposal that is {locked.status} cannot be canceled")
    previous = locked.status
    locked.status = Status.CANCELED
    locked.save(update_fields=["status"])
    entry_append(actor=by, action="proposal.canceled", subject=locked.ledger_subject, payload={"from": previous})
    return _refresh_into(proposal, locked)


@transaction.atomic
def vote_cast(*, proposal: Proposal, voter, choice: str) -> Vote:
    """Cast or change the member's vote while the window is open. Weight is computed and recorded now.

    Only an eligible member votes (``governance.eligibility``, under the rule frozen onto the proposal);
    otherwise ``NotEligible`` says what is missing. The ledger entry records the eligibility basis.
    Re-casting the same choice changes nothing and appends nothing.
    """
    _require_member(voter)
    if choice not in Vote.Choice.values:
        raise serializers.ValidationError({"choice": [f"Must be one of {', '.join(Vote.Choice.values)}."]})
    locked = _locked(proposal)  # a close waiting on this lock sees the vote, or the vote sees the close
    now = timezone.now()
    if locked.status != Status.ACTIVE:
        raise ProposalStateError(f"voting is only possible while a proposal is active, not {locked.status}")
    if not (locked.opens_at <= now < locked.closes_at):
        raise VotingClosed("the voting window is closed")
    eligibility = proposal_voter_eligibility(proposal=locked, user=voter)
    if not eligibility.eligible:
        raise NotEligible(eligibility.reason)
    weight = vote_weight(voter)
    vote = Vote.objects.select_for_update().filter(proposal=locked, voter=voter).first()
    if vote is None:
        vote = Vote.objects.create(
            proposal=locked, voter=voter, choice=choice, weight=weight, created_at=now, updated_at=now
        )
        action, previous = "vote.cast", None
    elif vote.choice == choice:
        return vote
    else:
        previous = vote.choice
        vote.choice, vote.weight, vote.updated_at = choice, weight, now
        vote.save(update_fields=["choice", "weight", "updated_at"])
        action = "vote.changed"
    entry_append(
        actor=voter,
        action=action,
        subject=locked.ledger_subject,
        payload={
            "choice": choice,
            "previous": previous,
            "weight": number(weight),
            "eligibility": eligibility.as_ledger(),
        },
    )
    return vote


@transaction.atomic
def voter_approval_grant(*, user, by, note: str = "") -> VoterApproval:
    """Staff approve ``user`` as a voting member (the ``staff_approved`` eligibility term). Idempotent."""
    _require_staff(by)
    note = (note or "").strip()
    if len(note) > 200:
        raise serializers.ValidationError({"note": ["At most 200 characters."]})
    approval, created = VoterApproval.objects.get_or_create(
        user=user, defaults={"approved_by": by, "approved_at": timezone.now(), "note": note}
    )
    if created:
        entry_append(actor=by, action="member.approved", subject=f"user:{user.pk}", payload={"note": note})
    return approval


@transaction.atomic
def voter_approval_revoke(*, user, by, reason: str = "") -> bool:
    """Withdraw a staff approval; votes already cast stand. Returns whether there was one."""
    _require_staff(by)
    deleted, _ = VoterApproval.objects.filter(user=user).delete()
    if deleted:
        entry_append(
            actor=by, action="member.approval_revoked", subject=f"user:{user.pk}", payload={"reason": (reason or "")[:200]}
        )
    return bool(deleted)


@transaction.atomic
def comment_post(*, proposal: Proposal, author, body: str) -> Comment:
    _require_member(author)
    body = (body or "").strip()
    if not body:
        raise serializers.ValidationError({"body": ["Write something first."]})
    if len(body) > MAX_COMMENT:
        raise serializers.ValidationError({"body": [f"At most {MAX_COMMENT} characters."]})
    status = Proposal.objects.filter(pk=proposal.pk).values_list("status", flat=True).get()
    if status == Status.CANCELED:
        raise ProposalStateError("a canceled proposal takes no more comments")
    comment = Comment.objects.create(proposal=proposal, author=author, body=body, created_at=timezone.now())
    entry_append(
        actor=author, action="comment.posted", subject=proposal.ledger_subject, payload={"comment_id": comment.pk}
    )
    return comment


@transaction.atomic
def proposal_close(*, proposal_id: int) -> Proposal:
    """Close an active proposal whose window has passed: tally, decide, and enact a successful guardrail.

    Idempotent: the row is locked and a proposal that is no longer active is returned unchanged, so
    the beat task and a per-proposal task may both run it.
    """
    proposal = Proposal.objects.select_for_update().get(pk=proposal_id)
    if proposal.status != Status.ACTIVE:
        return proposal
    now = timezone.now()
    if now < proposal.closes_at:
        raise ProposalStateError(f"the voting window is open until {proposal.closes_at.isoformat()}")
    tally = proposal_tally(proposal=proposal)
    proposal.status = Status.SUCCEEDED if tally.succeeds else Status.DEFEATED
    proposal.closed_at = now
    proposal.save(update_fields=["status", "closed_at"])
    entry_append(
        actor=None,
        action="proposal.closed",
        subject=proposal.ledger_subject,
        payload={"outcome": proposal.status, "tally": tally.as_dict()},
    )
    if proposal.status == Status.SUCCEEDED and proposal.kind == Proposal.Kind.GUARDRAIL:
        _guardrail_enact(proposal=proposal, now=now)
    return proposal


def _guardrail_enact(*, proposal: Proposal, now) -> None:
    """A guardrail proposal that passed takes effect at once, without staff approval."""
    spec = proposal.spec
    if spec["action"] == "adopt":
        guardrail = Guardrail.objects.create(
            proposal=proposal,
            title=proposal.title,
            kind=spec["kind"],
            patterns=spec["patterns"],
            description=spec["description"],
            active=True,
            enacted_at=now,
        )
        entry_append(
            actor=None,
            action="guardrail.enacted",
            subject=f"guardrail:{guardrail.pk}",
            payload={"proposal_id": proposal.pk, **guardrail.as_policy()},
        )
        outcome = {"guardrail_id": guardrail.pk, "action": "adopt"}
    else:
        guardrail = Guardrail.objects.select_for_update().filter(pk=spec["guardrail_id"]).first()
        if guardrail is not None and guardrail.active:
            guardrail.active, guardrail.retired_at, guardrail.retired_by = False, now, proposal
            guardrail.save(update_fields=["active", "retired_at", "retired_by"])
            entry_append(
                actor=None,
                action="guardrail.retired",
                subject=f"guardrail:{guardrail.pk}",
                payload={"proposal_id": proposal.pk, "guardrail_id": guardrail.pk},
            )
            outcome = {"guardrail_id": guardrail.pk, "action": "retire"}
        else:
            # Retired meanwhile by another proposal: nothing left to do, but say so in the record.
            outcome = {"guardrail_id": spec["guardrail_id"], "action": "retire", "already_retired": True}
    proposal.status, proposal.enacted_at, proposal.outcome = Status.ENACTED, now, outcome
    proposal.save(update_fields=["status", "enacted_at", "outcome"])
    entry_append(actor=None, action="proposal.enacted", subject=proposal.ledger_subject, payload={"outcome": outcome})


def proposals_close_due() -> list[int]:
    """Close every active proposal whose window has passed, each in its own transaction."""
    from governance.selectors import proposals_due

    closed = []
    for proposal_id in proposals_due(now=timezone.now()).values_list("id", flat=True):
        try:
            proposal = proposal_close(proposal_id=proposal_id)
        except Exception:  # one bad proposal must not stop the others from closing
            logger.exception("closing proposal %s failed", proposal_id)
            continue
        closed.append(proposal.pk)
    return closed


def _require_staff(user) -> None:
    _require_member(user)
    if not user.is_staff:
        raise NotAllowed("only staff can do this")


@transaction.atomic
def proposal_approve(*, proposal: Proposal, by) -> Proposal:
    """succeeded -> approved (training only). Training is told once the transaction has committed."""
    _require_staff(by)
    locked = _locked(proposal)
    if locked.kind != Proposal.Kind.TRAINING:
        raise ProposalStateError("guardrail proposals take effect on success and need no approval")
    if locked.status != Status.SUCCEEDED:
        raise ProposalStateError(f"only a succeeded proposal can be approved, not one that is {locked.status}")
    locked.status, locked.decided_at, locked.decided_by = Status.APPROVED, timezone.now(), by
    locked.save(update_fields=["status", "decided_at", "decided_by"])
    entry_append(
        actor=by, action="proposal.approved", subject=locked.ledger_subject, payload={"content_hash": locked.content_hash}
    )
    proposal_id = locked.pk
    transaction.on_commit(
        lambda: training_proposal_approved.send_robust(sender=Proposal, proposal_id=proposal_id)
    )
    return _refresh_into(proposal, locked)


@transaction.atomic
def proposal_veto(*, proposal: Proposal, by, reason: str) -> Proposal:
    """succeeded -> vetoed (terminal), with the reason on the record."""
    _require_staff(by)
    reason = (reason or "").strip()
    if not reason:
        raise serializers.ValidationError({"reason": ["A veto needs a reason; it is published in the ledger."]})
    if len(reason) > MAX_REASON:
        raise serializers.ValidationError({"reason": [f"At most {MAX_REASON} characters."]})
    locked = _locked(proposal)
    if locked.kind != Proposal.Kind.TRAINING:
        raise ProposalStateError("guardrail proposals take effect on success and cannot be vetoed")
    if locked.status != Status.SUCCEEDED:
        raise ProposalStateError(f"only a succeeded proposal can be vetoed, not one that is {locked.status}")
    locked.status, locked.decided_at, locked.decided_by = Status.VETOED, timezone.now(), by
    locked.veto_reason = reason
    locked.save(update_fields=["status", "decided_at", "decided_by", "veto_reason"])
    entry_append(actor=by, action="proposal.vetoed", subject=locked.ledger_subject, payload={"reason": reason})
    return _refresh_into(proposal, locked)


@transaction.atomic
def proposal_enact(*, proposal: Proposal, by=None, outcome: dict) -> Proposal:
    """approved -> enacted for a training proposal, called by training when it creates the run."""
    locked = _locked(proposal)
    if locked.kind != Proposal.Kind.TRAINING:
        raise ProposalStateError("guardrail proposals are enacted when they succeed")
    if locked.status != Status.APPROVED:
        raise ProposalStateError(f"only an approved proposal can be enacted, not one that is {locked.status}")
    locked.status, locked.enacted_at, locked.outcome = Status.ENACTED, timezone.now(), dict(outcome)
    locked.save(update_fields=["status", "enacted_at", "outcome"])
    entry_append(actor=by, action="proposal.enacted", subject=locked.ledger_subject, payload={"outcome": outcome})
    return _refresh_into(proposal, locked)
