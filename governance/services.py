"""Every write of governance. Each service checks the current state, changes it and appends the ledger
entry in the same transaction."""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import Sum
from django.utils import timezone
from rest_framework import serializers

from core.notifications import notify_users
from governance.eligibility import eligible_voters, parse_rule, proposal_voter_eligibility, quorum_for
from governance.errors import NotAllowed, NotEligible, ProposalStateError, VotingClosed
from governance.models import (
    Comment,
    Delegation,
    Guardrail,
    Notification,
    Proposal,
    ProposalRevision,
    Vote,
    VoterApproval,
)
from governance.selectors import number, proposal_tally
from governance.signals import training_proposal_approved
from governance.specs import content_hash, spec_normalise
from governance.weights import one_member_one_vote, vote_weight
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


def _check_voting_hours(voting_hours) -> timedelta | None:
    """The author's window in hours, within AGORA_VOTING_MIN..MAX; None keeps the default."""
    if voting_hours in (None, ""):
        return None
    low, high = settings.AGORA_VOTING_MIN, settings.AGORA_VOTING_MAX
    bounds = f"between {_hours(low)} and {_hours(high)} hours"
    try:
        hours = float(voting_hours)
    except (TypeError, ValueError):
        raise serializers.ValidationError({"voting_hours": [f"A number of hours {bounds}."]}) from None
    period = timedelta(hours=hours) if hours == hours and abs(hours) < 1e6 else None
    if period is None or not low <= period <= high:
        raise serializers.ValidationError({"voting_hours": [f"The voting window must be {bounds}."]})
    return period


def _hours(period: timedelta) -> str:
    return f"{period.total_seconds() / 3600:g}"


def _revision_add(proposal: Proposal) -> ProposalRevision:
    number = (proposal.revisions.order_by("-number").values_list("number", flat=True).first() or 0) + 1
    return ProposalRevision.objects.create(
        proposal=proposal, number=number, title=proposal.title, body=proposal.body, spec=proposal.spec,
        content_hash=proposal.content_hash, created_at=timezone.now(),
    )


@transaction.atomic
def proposal_submit(
    *, author, kind: str, title: str, body: str = "", spec: dict, open_now: bool = False, voting_hours=None
) -> Proposal:
    """Validate and freeze the spec, store the proposal as a draft and, if asked, open the vote at once.

    ``voting_hours`` chooses the window (within AGORA_VOTING_MIN/MAX_HOURS); without it the default applies.
    Raises DRF ``ValidationError`` nested like the input (``spec.diloco.inner_lr``) and stores nothing.
    """
    _require_member(author)
    title, body = _check_text(title=title, body=body)
    period = _check_voting_hours(voting_hours)
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
        voting_period=period,
    )
    _revision_add(proposal)
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
def proposal_edit(*, proposal: Proposal, by, title: str, body: str = "", spec: dict, voting_hours=None) -> Proposal:
    """The author rewrites a draft: the spec is validated and frozen again, the content hash recomputed and
    the previous text kept as a revision. Only drafts change; once the vote opens the text is final."""
    _require_member(by)
    locked = _locked(proposal)
    if locked.author_id != by.pk:
        raise NotAllowed("only the author can edit a proposal")
    if locked.status != Status.DRAFT:
        raise ProposalStateError(f"only a draft can be edited, not a proposal that is {locked.status}")
    title, body = _check_text(title=title, body=body)
    period = _check_voting_hours(voting_hours)
    frozen = spec_normalise(kind=locked.kind, spec=spec)
    if locked.kind == Proposal.Kind.GUARDRAIL:
        _check_retire_target(frozen)
    if not locked.revisions.exists():  # drafts from before revisions were kept: save the original first
        _revision_add(locked)
    previous_hash = locked.content_hash
    locked.title, locked.body, locked.spec, locked.voting_period = title, body, frozen, period
    locked.content_hash = content_hash(frozen)
    locked.save(update_fields=["title", "body", "spec", "content_hash", "voting_period"])
    revision = _revision_add(locked)
    entry_append(
        actor=by,
        action="proposal.edited",
        subject=locked.ledger_subject,
        payload={"revision": revision.number, "title": title, "previous_content_hash": previous_hash,
                 "content_hash": locked.content_hash, "spec": frozen},
    )
    return _refresh_into(proposal, locked)


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
    locked.closes_at = now + (locked.voting_period or settings.AGORA_VOTING_PERIOD)
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
    voters = eligible_voters(rule=locked.eligibility_rule, at=now).exclude(pk=by.pk).values_list("pk", flat=True)
    notify_users(
        user_ids=voters, kind=Notification.Kind.PROPOSAL_OPENED,
        text=f"Vote on #{locked.pk} {locked.title} until {locked.closes_at:%Y-%m-%d %H:%M} UTC",
        url=locked.get_absolute_url(),
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
    A direct vote replaces one a delegate cast for the member; the member's own delegators (who have not
    voted themselves) vote the same way, listed in the entry. Re-casting the same choice changes nothing
    and appends nothing. If the weight not yet cast can no longer change the outcome, the vote closes.
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
    overridden = None
    vote = Vote.objects.select_for_update().filter(proposal=locked, voter=voter).first()
    if vote is None:
        vote = Vote.objects.create(
            proposal=locked, voter=voter, choice=choice, weight=weight, created_at=now, updated_at=now
        )
        action, previous = "vote.cast", None
    elif vote.choice == choice and vote.via_id is None:
        return vote
    else:
        previous = vote.choice
        action = "vote.changed" if vote.via_id is None else "vote.cast"
        overridden = vote.via_id
        vote.choice, vote.weight, vote.updated_at, vote.via = choice, weight, now, None
        vote.save(update_fields=["choice", "weight", "updated_at", "via"])
    carried = _carry_delegated_votes(proposal=locked, delegate=voter, choice=choice, now=now)
    payload = {
        "choice": choice,
        "previous": previous,
        "weight": number(weight),
        "eligibility": eligibility.as_ledger(),
    }
    if action == "vote.cast" and previous is not None:
        payload["overrides_delegate"] = overridden
    if carried:
        payload["delegated"] = carried
    entry_append(actor=voter, action=action, subject=locked.ledger_subject, payload=payload)
    _close_if_decided(locked, now=now)
    return vote


def _carry_delegated_votes(*, proposal: Proposal, delegate, choice: str, now) -> list[dict]:
    """Cast or update the votes of members who delegated this proposal's topic to ``delegate`` and have not
    voted themselves; returns ``[{"voter": id, "weight": w}]`` for the ledger. A constant number of queries
    however many delegators (eligibility is the same rule as ``proposal_voter_eligibility``, as a query)."""
    delegators = _delegators_of(delegate=delegate, kind=proposal.kind)
    if not delegators:
        return []
    ids = [member.pk for member in delegators]
    eligible = set(
        eligible_voters(rule=proposal.eligibility_rule or None, at=proposal.opens_at)
        .filter(pk__in=ids).values_list("pk", flat=True)
    )
    existing = {v.voter_id: v for v in Vote.objects.select_for_update().filter(proposal=proposal, voter_id__in=ids)}
    created, updated, carried = [], [], []
    for delegator in sorted(delegators, key=lambda member: member.pk):
        vote = existing.get(delegator.pk)
        if (vote is not None and vote.via_id != delegate.pk) or delegator.pk not in eligible:
            continue  # the member's own vote stands, or they may not vote on this proposal
        weight = vote_weight(delegator)
        if vote is None:
            created.append(Vote(proposal=proposal, voter=delegator, via=delegate, choice=choice, weight=weight,
                                created_at=now, updated_at=now))
        elif vote.choice != choice or vote.weight != weight:
            vote.choice, vote.weight, vote.updated_at = choice, weight, now
            updated.append(vote)
        carried.append({"voter": delegator.pk, "weight": number(weight)})
    Vote.objects.bulk_create(created)
    Vote.objects.bulk_update(updated, ["choice", "weight", "updated_at"])
    return carried


def _delegators_of(*, delegate, kind: str) -> list:
    """Members whose delegation in force for ``kind`` names ``delegate`` (a delegation for the kind wins
    over the member's overall one)."""
    candidates = Delegation.objects.filter(delegate=delegate, kind__in=["", kind]).values("delegator")
    by_member: dict = {}
    for row in Delegation.objects.filter(delegator__in=candidates, kind__in=["", kind]).select_related("delegator"):
        current = by_member.get(row.delegator_id)
        if current is None or (row.kind and not current.kind):
            by_member[row.delegator_id] = row
    return [row.delegator for row in by_member.values() if row.delegate_id == delegate.pk and row.delegator.is_active]


def delegation_for(*, user, kind: str) -> Delegation | None:
    """The delegation in force for proposals of ``kind``: the one for the kind, else the overall one."""
    rows = {row.kind: row for row in Delegation.objects.filter(delegator=user, kind__in=["", kind]).select_related("delegate")}
    return rows.get(kind) or rows.get("")


def _resync_delegated_votes(*, delegator) -> list[int]:
    """After a delegation changes: on every active proposal, drop the votes delegates cast for this member
    and cast them again under the delegations now in force. The member's own votes are untouched.
    Returns the ids of the proposals whose tallies changed."""
    now = timezone.now()
    changed = []
    for proposal in Proposal.objects.select_for_update().filter(status=Status.ACTIVE, closes_at__gt=now).order_by("id"):
        own = Vote.objects.filter(proposal=proposal, voter=delegator).first()
        if own is not None and own.via_id is None:
            continue
        delegation = delegation_for(user=delegator, kind=proposal.kind)
        target = None
        if delegation is not None:
            target = Vote.objects.filter(proposal=proposal, voter=delegation.delegate_id, via__isnull=True).first()
        eligible = target is not None and proposal_voter_eligibility(proposal=proposal, user=delegator).eligible
        if own is not None and (not eligible or own.via_id != target.voter_id or own.choice != target.choice):
            own.delete()
            own = None
            changed.append(proposal.pk)
        if own is None and eligible:
            Vote.objects.create(proposal=proposal, voter=delegator, via_id=target.voter_id, choice=target.choice,
                                weight=vote_weight(delegator), created_at=now, updated_at=now)
            if proposal.pk not in changed:
                changed.append(proposal.pk)
    return changed


@transaction.atomic
def delegation_set(*, delegator, delegate, kind: str = "") -> Delegation:
    """``delegator`` lets ``delegate`` vote for them on every proposal (``kind`` empty) or on one kind.

    Replaces the delegator's delegation for that topic. Refused when it would make a chain: the delegate
    has delegated that topic themselves, or others have delegated that topic to the delegator. The votes
    the delegate already cast on open proposals count for the delegator at once (unless they voted)."""
    _require_member(delegator)
    if kind not in ("", *Proposal.Kind.values):
        raise serializers.ValidationError({"kind": [f"Must be empty (all proposals) or one of {', '.join(Proposal.Kind.values)}."]})
    if delegate is None or not getattr(delegate, "is_active", False):
        raise serializers.ValidationError({"delegate": ["No such member."]})
    if delegate.pk == delegator.pk:
        raise serializers.ValidationError({"delegate": ["You cannot delegate to yourself."]})
    overlapping = [""] + list(Proposal.Kind.values) if kind == "" else ["", kind]
    if Delegation.objects.filter(delegator=delegate, kind__in=overlapping).exists():
        raise serializers.ValidationError(
            {"delegate": [f"{delegate.username} has delegated their own vote on these proposals; delegate to "
                          "the member they chose instead (chains are not allowed)."]}
        )
    if Delegation.objects.filter(delegate=delegator, kind__in=overlapping).exists():
        raise serializers.ValidationError(
            {"delegate": ["Others have delegated these proposals to you; you cannot pass their votes on "
                          "(chains are not allowed)."]}
        )
    now = timezone.now()
    delegation, _ = Delegation.objects.update_or_create(
        delegator=delegator, kind=kind, defaults={"delegate": delegate, "created_at": now}
    )
    changed = _resync_delegated_votes(delegator=delegator)
    entry_append(
        actor=delegator, action="delegation.set", subject=f"user:{delegator.pk}",
        payload={"delegate": delegate.pk, "delegate_username": delegate.username, "topic": kind or "all",
                 "votes_updated_on": changed},
    )
    notify_users(user_ids=[delegate.pk], kind=Notification.Kind.DELEGATION,
                 text=f"{delegator.username} delegated their vote on {delegation.topic.lower()} to you",
                 url="/delegations/")
    for proposal_id in changed:
        _close_if_decided(Proposal.objects.select_for_update().get(pk=proposal_id), now=now)
    return delegation


@transaction.atomic
def delegation_revoke(*, delegator, kind: str = "") -> bool:
    """Withdraw the delegation for this topic; votes the delegate cast for the member on open proposals
    are withdrawn too (or follow the overall delegation). Returns whether there was one."""
    _require_member(delegator)
    row = Delegation.objects.select_for_update().filter(delegator=delegator, kind=kind).first()
    if row is None:
        return False
    delegate_id = row.delegate_id
    row.delete()
    changed = _resync_delegated_votes(delegator=delegator)
    entry_append(
        actor=delegator, action="delegation.revoked", subject=f"user:{delegator.pk}",
        payload={"delegate": delegate_id, "topic": kind or "all", "votes_updated_on": changed},
    )
    return True


def remaining_weight(*, proposal: Proposal) -> Decimal:
    """The most weight still to be cast: members eligible under the proposal's rule who have no vote yet
    (a delegate's vote for them counts as cast; they may still override it with the same weight)."""
    pending = eligible_voters(rule=proposal.eligibility_rule or None, at=proposal.opens_at).exclude(
        pk__in=Vote.objects.filter(proposal=proposal).values("voter")
    )
    if settings.AGORA_VOTE_WEIGHT_STRATEGY == f"{one_member_one_vote.__module__}.{one_member_one_vote.__name__}":
        return Decimal(pending.count())
    return sum((vote_weight(user) for user in pending.iterator()), Decimal(0))


def outcome_decided(*, proposal: Proposal) -> bool:
    """Whether the outcome is settled whatever the members without a vote do (``Tally.settled``).

    A vote a delegate cast for a member is not final: the member may override it or revoke the delegation
    while voting is open. So only direct votes are taken as cast, and delegated weight counts as still open
    (it could go either way, or nowhere)."""
    delegated = Vote.objects.filter(proposal=proposal, via__isnull=False).aggregate(
        w=Sum("weight", default=Decimal(0)))["w"]
    return proposal_tally(proposal=proposal, direct_only=True).settled(
        remaining=remaining_weight(proposal=proposal) + delegated)


def _close_if_decided(locked: Proposal, *, now) -> bool:
    if not settings.AGORA_EARLY_CLOSE or locked.status != Status.ACTIVE or now >= locked.closes_at:
        return False
    if not outcome_decided(proposal=locked):
        return False
    _close(locked, now=now, reason="decided", by=None)
    return True


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


MENTION = re.compile(r"(?<![\w@])@([\w.+-]{1,150})")
MAX_MENTIONS = 20


@transaction.atomic
def comment_post(*, proposal: Proposal, author, body: str, parent_id: int | None = None) -> Comment:
    """A comment, or a reply to one of the proposal's comments (``parent_id``). Members named as
    ``@username`` are notified (at most 20 per comment)."""
    _require_member(author)
    body = (body or "").strip()
    if not body:
        raise serializers.ValidationError({"body": ["Write something first."]})
    if len(body) > MAX_COMMENT:
        raise serializers.ValidationError({"body": [f"At most {MAX_COMMENT} characters."]})
    parent = None
    if parent_id not in (None, ""):
        parent = Comment.objects.filter(pk=parent_id, proposal_id=proposal.pk).first() if str(parent_id).isdigit() else None
        if parent is None:
            raise serializers.ValidationError({"parent": ["No such comment on this proposal."]})
    status = Proposal.objects.filter(pk=proposal.pk).values_list("status", flat=True).get()
    if status == Status.CANCELED:
        raise ProposalStateError("a canceled proposal takes no more comments")
    comment = Comment.objects.create(
        proposal=proposal, author=author, body=body, parent=parent, created_at=timezone.now()
    )
    names = list(dict.fromkeys(MENTION.findall(body)))[:MAX_MENTIONS]
    from django.contrib.auth import get_user_model

    mentioned = list(
        get_user_model().objects.filter(username__in=names, is_active=True).exclude(pk=author.pk).values_list("pk", flat=True)
    )
    payload = {"comment_id": comment.pk}
    if parent is not None:
        payload["parent_id"] = parent.pk
    if mentioned:
        payload["mentions"] = sorted(mentioned)
    entry_append(actor=author, action="comment.posted", subject=proposal.ledger_subject, payload=payload)
    notify_users(
        user_ids=mentioned, kind=Notification.Kind.MENTION,
        text=f"{author.username} mentioned you on #{proposal.pk} {proposal.title}",
        url=f"{proposal.get_absolute_url()}#comment-{comment.pk}",
    )
    return comment


@transaction.atomic
def proposal_close(*, proposal_id: int) -> Proposal:
    """Close an active proposal whose window has passed (or whose outcome is already decided): tally,
    decide, and enact a successful guardrail.

    Idempotent: the row is locked and a proposal that is no longer active is returned unchanged, so
    the beat task and a per-proposal task may both run it.
    """
    proposal = Proposal.objects.select_for_update().get(pk=proposal_id)
    if proposal.status != Status.ACTIVE:
        return proposal
    now = timezone.now()
    if now < proposal.closes_at:
        if _close_if_decided(proposal, now=now):
            return proposal
        raise ProposalStateError(f"the voting window is open until {proposal.closes_at.isoformat()}")
    _close(proposal, now=now, reason="", by=None)
    return proposal


@transaction.atomic
def proposal_close_early(*, proposal: Proposal, by, reason: str) -> Proposal:
    """Staff end a vote before its window does, with a public reason; the tally as it stands decides.

    Idempotent like ``proposal_close``: a proposal that has already closed is returned unchanged."""
    _require_staff(by)
    reason = (reason or "").strip()
    if not reason:
        raise serializers.ValidationError({"reason": ["Closing early needs a reason; it is published in the ledger."]})
    if len(reason) > 500:
        raise serializers.ValidationError({"reason": ["At most 500 characters."]})
    locked = _locked(proposal)
    if locked.status != Status.ACTIVE:
        if locked.status in (Status.DRAFT, Status.CANCELED):
            raise ProposalStateError(f"only an active proposal can be closed, not one that is {locked.status}")
        return _refresh_into(proposal, locked)
    _close(locked, now=timezone.now(), reason=reason, by=by)
    return _refresh_into(proposal, locked)


def _close(proposal: Proposal, *, now, reason: str, by) -> None:
    """Decide a locked, active proposal from its tally. ``reason`` is empty when the window ended,
    ``"decided"`` for the automatic early close, or a staff member's words."""
    tally = proposal_tally(proposal=proposal)
    proposal.status = Status.SUCCEEDED if tally.succeeds else Status.DEFEATED
    proposal.closed_at = now
    early = now < proposal.closes_at
    proposal.close_reason = reason if early else ""
    proposal.save(update_fields=["status", "closed_at", "close_reason"])
    payload = {"outcome": proposal.status, "tally": tally.as_dict()}
    if early:
        payload.update(early=True, reason=reason, window_ended_at=proposal.closes_at.isoformat())
    entry_append(actor=by, action="proposal.closed", subject=proposal.ledger_subject, payload=payload)
    voters = Vote.objects.filter(proposal=proposal).values_list("voter", flat=True)
    how = " early" if early else ""
    notify_users(
        user_ids=[proposal.author_id, *voters], kind=Notification.Kind.PROPOSAL_CLOSED,
        text=f"#{proposal.pk} {proposal.title} closed{how}: {proposal.get_status_display().lower()}",
        url=proposal.get_absolute_url(),
    )
    if proposal.status == Status.SUCCEEDED and proposal.kind == Proposal.Kind.GUARDRAIL:
        _guardrail_enact(proposal=proposal, now=now)


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
    """Close every active proposal whose window has passed, or whose outcome the weight not yet cast can
    no longer change (a member's eligibility may have lapsed since the last vote), each in its own
    transaction."""
    from governance.selectors import proposals_due

    closed = []
    due = list(proposals_due(now=timezone.now()).values_list("id", flat=True))
    if settings.AGORA_EARLY_CLOSE:
        for proposal in Proposal.objects.filter(status=Status.ACTIVE).exclude(pk__in=due).order_by("closes_at", "id"):
            if outcome_decided(proposal=proposal):
                due.append(proposal.pk)
    for proposal_id in due:
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
    notify_users(
        user_ids=[locked.author_id, *Vote.objects.filter(proposal=locked).values_list("voter", flat=True)],
        kind=Notification.Kind.PROPOSAL_APPROVED, text=f"#{locked.pk} {locked.title} was approved by staff",
        url=locked.get_absolute_url(),
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
    notify_users(
        user_ids=[locked.author_id, *Vote.objects.filter(proposal=locked).values_list("voter", flat=True)],
        kind=Notification.Kind.PROPOSAL_APPROVED, text=f"#{locked.pk} {locked.title} was vetoed: {reason}"[:300],
        url=locked.get_absolute_url(),
    )
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
