"""Reads for governance. Tallies are always computed from the votes (aggregate queries), never stored."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from decimal import Decimal

from django.db.models import Count, DecimalField, OuterRef, Q, QuerySet, Subquery, Sum, Value
from django.db.models.functions import Coalesce

from governance.models import Comment, Delegation, Guardrail, Notification, Proposal, ProposalRevision, Vote

ZERO = Decimal(0)
WEIGHT = DecimalField(max_digits=20, decimal_places=4)


@dataclass(frozen=True)
class Tally:
    yes: Decimal
    no: Decimal
    abstain: Decimal
    votes: int
    quorum: Decimal | None
    threshold: Decimal | None

    @property
    def total(self) -> Decimal:
        return self.yes + self.no + self.abstain

    @property
    def quorum_reached(self) -> bool:
        return self.quorum is not None and self.total >= self.quorum

    @property
    def yes_share(self) -> Decimal | None:
        decided = self.yes + self.no
        return self.yes / decided if decided else None

    @property
    def passing(self) -> bool:
        """yes / (yes + no) strictly above the threshold (compared without division, so exactly)."""
        if self.threshold is None:
            return False
        decided = self.yes + self.no
        return decided > 0 and self.yes > self.threshold * decided

    @property
    def succeeds(self) -> bool:
        return self.quorum_reached and self.passing

    def settled(self, *, remaining: Decimal) -> bool:
        """Whether the outcome stays the same however ``remaining`` uncast weight is cast (or not).

        Success is settled when the quorum is already reached and yes stays above the threshold even if all
        the remaining weight votes no. Defeat is settled when, even if all of it votes yes, the quorum is
        not reached or yes does not exceed the threshold."""
        if self.quorum is None or self.threshold is None:
            return False
        if self.quorum_reached and self.yes > self.threshold * (self.yes + self.no + remaining):
            return True
        best_yes = self.yes + remaining
        return self.total + remaining < self.quorum or not best_yes > self.threshold * (best_yes + self.no)

    def as_dict(self) -> dict:
        """JSON-ready numbers (ints where whole) for the API and the ledger."""
        data = asdict(self)
        data.update(total=self.total, quorum_reached=self.quorum_reached, passing=self.passing)
        share = self.yes_share
        data["yes_share"] = None if share is None else round(float(share), 4)
        return {key: number(value) if isinstance(value, Decimal) else value for key, value in data.items()}


def number(value: Decimal | None):
    if value is None:
        return None
    return int(value) if value == value.to_integral_value() else float(value)


def _weight_sum(choice: str):
    """Correlated subquery rather than a join + GROUP BY: only the rows of the page are summed."""
    votes = (
        Vote.objects.filter(proposal=OuterRef("pk"), choice=choice)
        .order_by()
        .values("proposal")
        .annotate(total=Sum("weight"))
        .values("total")
    )
    return Coalesce(Subquery(votes, output_field=WEIGHT), Value(ZERO, output_field=WEIGHT), output_field=WEIGHT)


def _vote_count():
    votes = Vote.objects.filter(proposal=OuterRef("pk")).order_by().values("proposal").annotate(n=Count("id"))
    return Coalesce(Subquery(votes.values("n")), Value(0))


def with_tallies(qs: QuerySet[Proposal], *, user=None) -> QuerySet[Proposal]:
    qs = qs.annotate(
        yes_weight=_weight_sum(Vote.Choice.YES),
        no_weight=_weight_sum(Vote.Choice.NO),
        abstain_weight=_weight_sum(Vote.Choice.ABSTAIN),
        vote_count=_vote_count(),
    )
    if user is not None and user.is_authenticated:
        mine = Vote.objects.filter(proposal=OuterRef("pk"), voter=user).values("choice")[:1]
        qs = qs.annotate(my_choice=Subquery(mine))
    return qs


def annotated_tally(proposal: Proposal) -> Tally:
    """The tally of a proposal fetched through ``with_tallies`` (no further query)."""
    return Tally(
        yes=proposal.yes_weight,
        no=proposal.no_weight,
        abstain=proposal.abstain_weight,
        votes=proposal.vote_count,
        quorum=proposal.quorum,
        threshold=proposal.threshold,
    )


def proposal_tally(*, proposal: Proposal, direct_only: bool = False) -> Tally:
    """The proposal's tally; with ``direct_only``, of the votes members cast themselves (not their delegates)."""
    votes = Vote.objects.filter(proposal=proposal)
    if direct_only:
        votes = votes.filter(via__isnull=True)
    sums = votes.aggregate(
        yes=Sum("weight", filter=Q(choice=Vote.Choice.YES), default=ZERO),
        no=Sum("weight", filter=Q(choice=Vote.Choice.NO), default=ZERO),
        abstain=Sum("weight", filter=Q(choice=Vote.Choice.ABSTAIN), default=ZERO),
        votes=Count("id"),
    )
    return Tally(quorum=proposal.quorum, threshold=proposal.threshold, **sums)


def proposals_list(*, kind: str = "", status: str = "", q: str = "", user=None) -> QuerySet[Proposal]:
    qs = Proposal.objects.select_related("author")
    if kind:
        qs = qs.filter(kind=kind)
    if status:
        qs = qs.filter(status=status)
    if q:
        qs = qs.filter(Q(title__icontains=q) | Q(body__icontains=q))
    return with_tallies(qs, user=user).order_by("-created_at", "-id")


def proposal_get(*, pk: int, user=None) -> Proposal:
    """One proposal with its tally annotations and the viewer's vote; raises ``Proposal.DoesNotExist``."""
    return with_tallies(Proposal.objects.select_related("author", "decided_by"), user=user).get(pk=pk)


def proposal_votes(*, proposal: Proposal) -> QuerySet[Vote]:
    return proposal.votes.select_related("voter", "via").order_by("created_at", "id")


def proposal_comments(*, proposal: Proposal):
    return proposal.comments.select_related("author").order_by("created_at", "id")


def comment_thread(*, proposal: Proposal) -> list[tuple[Comment, int]]:
    """The proposal's comments in reading order, each reply under its parent: ``[(comment, depth)]``.
    One query; depth is capped for display at 6."""
    comments = list(proposal_comments(proposal=proposal))
    children: dict = {}
    for comment in comments:
        children.setdefault(comment.parent_id, []).append(comment)
    out: list[tuple[Comment, int]] = []
    stack = [(comment, 0) for comment in reversed(children.get(None, []))]
    while stack:
        comment, depth = stack.pop()
        out.append((comment, min(depth, 6)))
        stack.extend((child, depth + 1) for child in reversed(children.get(comment.pk, [])))
    return out


def proposal_revisions(*, proposal: Proposal) -> list[ProposalRevision]:
    return list(proposal.revisions.order_by("number"))


def delegations_of(*, user) -> dict:
    """The member's delegations (by topic) and who delegates to them."""
    return {
        "mine": list(Delegation.objects.filter(delegator=user).select_related("delegate").order_by("kind")),
        "to_me": list(Delegation.objects.filter(delegate=user).select_related("delegator").order_by("kind", "id")),
    }


def delegation_in_force(*, user, kind: str) -> Delegation | None:
    if not user.is_authenticated:
        return None
    rows = {d.kind: d for d in Delegation.objects.filter(delegator=user, kind__in=["", kind]).select_related("delegate")}
    return rows.get(kind) or rows.get("")


def notifications_for(*, user) -> QuerySet[Notification]:
    return Notification.objects.filter(user=user).order_by("-created_at", "-id")


def member_needs(*, user) -> dict:
    """What waits for this member: open votes they have not cast (a delegate's vote for them counts as
    not cast: they may still vote themselves), their drafts, and the proposals they voted yes on."""
    awaiting = (
        Proposal.objects.filter(status=Proposal.Status.ACTIVE)
        .exclude(votes__voter=user, votes__via__isnull=True)
        .order_by("closes_at", "id")
    )
    return {
        "awaiting_vote": list(awaiting[:20]),
        "my_drafts": list(Proposal.objects.filter(author=user, status=Proposal.Status.DRAFT).order_by("-created_at")[:20]),
        "voted_yes_ids": list(
            Vote.objects.filter(voter=user, choice=Vote.Choice.YES, proposal__kind=Proposal.Kind.TRAINING)
            .values_list("proposal_id", flat=True)
        ),
    }


def my_vote(*, proposal: Proposal, user) -> Vote | None:
    if not user.is_authenticated:
        return None
    return Vote.objects.filter(proposal=proposal, voter=user).first()


def guardrails_active(*, kind: str | None = None) -> list[dict]:
    """Guardrails in force, in the JSON shape agents and ``diloco.guardrails`` use."""
    qs = Guardrail.objects.filter(active=True).order_by("id")
    if kind:
        qs = qs.filter(kind=kind)
    return [guardrail.as_policy() for guardrail in qs]


def guardrails_for_page() -> dict:
    base = Guardrail.objects.select_related("proposal", "retired_by")
    return {
        "active": list(base.filter(active=True).order_by("kind", "id")),
        "retired": list(base.filter(active=False).order_by("-retired_at", "-id")[:50]),
    }


def guardrail_retire_pending(*, guardrail_ids: list[int]) -> dict[int, Proposal]:
    """Open retire proposals per guardrail id, so the page can link them instead of inviting duplicates."""
    pending = Proposal.objects.filter(
        kind=Proposal.Kind.GUARDRAIL,
        status__in=[Proposal.Status.DRAFT, Proposal.Status.ACTIVE],
        spec__action="retire",
    ).only("id", "title", "spec", "status")
    return {p.spec.get("guardrail_id"): p for p in pending if p.spec.get("guardrail_id") in guardrail_ids}


def training_proposals_to_enact() -> QuerySet[Proposal]:
    return Proposal.objects.filter(kind=Proposal.Kind.TRAINING, status=Proposal.Status.APPROVED).order_by(
        "decided_at", "id"
    )


def proposals_due(*, now) -> QuerySet[Proposal]:
    return Proposal.objects.filter(status=Proposal.Status.ACTIVE, closes_at__lte=now).order_by("closes_at", "id")


def member_activity(*, user) -> dict:
    return {
        "proposals": list(Proposal.objects.filter(author=user).order_by("-created_at", "-id")[:50]),
        "votes_cast": Vote.objects.filter(voter=user).count(),
    }


def home_summary() -> dict:
    return {
        "active_proposals": Proposal.objects.filter(status=Proposal.Status.ACTIVE).count(),
        "active_guardrails": Guardrail.objects.filter(active=True).count(),
    }
