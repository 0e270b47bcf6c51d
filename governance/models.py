from django.conf import settings
from django.db import models
from django.urls import reverse
from django.utils import timezone


class Proposal(models.Model):
    """A training run or a guardrail policy put to the members' vote.

    ``spec`` is frozen at submission (validated, normalised, defaults filled in) and ``content_hash`` is the
    sha256 of its canonical JSON. The voting window, quorum and threshold are frozen when it opens.
    """

    class Kind(models.TextChoices):
        TRAINING = "training", "Training run"
        GUARDRAIL = "guardrail", "Guardrail"

    class Status(models.TextChoices):
        DRAFT = "draft", "Draft"
        ACTIVE = "active", "Voting"
        SUCCEEDED = "succeeded", "Succeeded"
        DEFEATED = "defeated", "Defeated"
        APPROVED = "approved", "Approved"
        VETOED = "vetoed", "Vetoed"
        ENACTED = "enacted", "Enacted"
        CANCELED = "canceled", "Canceled"

    kind = models.CharField(max_length=16, choices=Kind.choices)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.DRAFT)
    title = models.CharField(max_length=200)
    body = models.TextField(blank=True, help_text="Markdown.")
    author = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="proposals")
    spec = models.JSONField()
    content_hash = models.CharField(max_length=64)
    created_at = models.DateTimeField(default=timezone.now)
    opens_at = models.DateTimeField(null=True, blank=True)
    closes_at = models.DateTimeField(null=True, blank=True)
    quorum = models.DecimalField(max_digits=14, decimal_places=4, null=True, blank=True)
    # Frozen at opening too: who may vote (AGORA_VOTER_ELIGIBILITY) and how many members that was then;
    # the quorum is a fraction of that count.
    eligibility_rule = models.CharField(max_length=500, blank=True)
    eligible_voters = models.PositiveIntegerField(null=True, blank=True)
    threshold = models.DecimalField(max_digits=5, decimal_places=4, null=True, blank=True)
    closed_at = models.DateTimeField(null=True, blank=True)
    decided_at = models.DateTimeField(null=True, blank=True)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    veto_reason = models.TextField(blank=True)
    enacted_at = models.DateTimeField(null=True, blank=True)
    outcome = models.JSONField(default=dict, blank=True)
    # Chosen by the author within AGORA_VOTING_MIN/MAX; empty means the default AGORA_VOTING_PERIOD.
    voting_period = models.DurationField(null=True, blank=True)
    # Why the vote closed before its window ended: "decided" (the weight not yet cast could no longer change
    # the outcome) or a staff member's reason.
    close_reason = models.CharField(max_length=500, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["status", "closes_at"], name="gov_proposal_status_closes"),
            models.Index(fields=["kind", "status"], name="gov_proposal_kind_status"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(kind__in=["training", "guardrail"]), name="gov_proposal_kind_valid"
            ),
            models.CheckConstraint(
                condition=models.Q(
                    status__in=[
                        "draft", "active", "succeeded", "defeated", "approved", "vetoed", "enacted", "canceled",
                    ]
                ),
                name="gov_proposal_status_valid",
            ),
            models.CheckConstraint(
                condition=models.Q(opens_at__isnull=True)
                | models.Q(closes_at__isnull=True)
                | models.Q(closes_at__gt=models.F("opens_at")),
                name="gov_proposal_window_ordered",
            ),
            models.CheckConstraint(
                condition=models.Q(threshold__isnull=True) | models.Q(threshold__gte=0, threshold__lte=1),
                name="gov_proposal_threshold_range",
            ),
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.title}"

    def get_absolute_url(self) -> str:
        return reverse("governance:proposal_detail", args=[self.pk])

    @property
    def ledger_subject(self) -> str:
        return f"proposal:{self.pk}"


class Vote(models.Model):
    class Choice(models.TextChoices):
        YES = "yes", "Yes"
        NO = "no", "No"
        ABSTAIN = "abstain", "Abstain"

    proposal = models.ForeignKey(Proposal, on_delete=models.CASCADE, related_name="votes")
    voter = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="votes")
    choice = models.CharField(max_length=8, choices=Choice.choices)
    # Set when the vote was cast by the voter's delegate; the voter's own vote (via empty) overrides it.
    via = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, null=True, blank=True, related_name="+"
    )
    # Recorded when cast so a later change of strategy or credits does not rewrite history.
    weight = models.DecimalField(max_digits=14, decimal_places=4)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [
            # Covers the tally subqueries (sum of weight per proposal and choice) without touching the table.
            models.Index(fields=["proposal", "choice", "weight"], name="gov_vote_tally"),
        ]
        constraints = [
            models.UniqueConstraint(fields=["proposal", "voter"], name="gov_vote_one_per_member"),
            models.CheckConstraint(condition=models.Q(weight__gte=0), name="gov_vote_weight_nonnegative"),
            models.CheckConstraint(
                condition=models.Q(choice__in=["yes", "no", "abstain"]), name="gov_vote_choice_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.voter} {self.choice} on #{self.proposal_id}"


class VoterApproval(models.Model):
    """A staff member approved this account as a voting member (the ``staff_approved`` eligibility term).

    Granted and revoked only through ``voter_approval_grant`` / ``voter_approval_revoke`` (ledger entries).
    """

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="voter_approval")
    approved_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    approved_at = models.DateTimeField(default=timezone.now)
    note = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["-approved_at", "-id"]

    def __str__(self) -> str:
        return f"{self.user} approved to vote"


class Comment(models.Model):
    proposal = models.ForeignKey(Proposal, on_delete=models.CASCADE, related_name="comments")
    parent = models.ForeignKey("self", on_delete=models.CASCADE, null=True, blank=True, related_name="replies")
    author = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    body = models.TextField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return f"comment by {self.author} on #{self.proposal_id}"


class Guardrail(models.Model):
    """A content policy in force (or retired), created only by enacting a guardrail proposal."""

    class Kind(models.TextChoices):
        DATA_FILTER = "data_filter", "Data filter"
        OUTPUT_FILTER = "output_filter", "Output filter"

    proposal = models.ForeignKey(Proposal, on_delete=models.PROTECT, related_name="adopted_guardrails")
    title = models.CharField(max_length=200)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    patterns = models.JSONField()
    description = models.TextField(blank=True)
    active = models.BooleanField(default=True)
    enacted_at = models.DateTimeField(default=timezone.now)
    retired_at = models.DateTimeField(null=True, blank=True)
    retired_by = models.ForeignKey(
        Proposal, on_delete=models.PROTECT, null=True, blank=True, related_name="retired_guardrails"
    )

    class Meta:
        ordering = ["-enacted_at", "-id"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(kind__in=["data_filter", "output_filter"]), name="gov_guardrail_kind_valid"
            ),
            models.CheckConstraint(
                condition=models.Q(active=True, retired_at__isnull=True)
                | models.Q(active=False, retired_at__isnull=False),
                name="gov_guardrail_active_xor_retired",
            ),
        ]

    def __str__(self) -> str:
        return f"guardrail #{self.pk} {self.title}"

    def get_absolute_url(self) -> str:
        return reverse("governance:guardrail_list") + f"#guardrail-{self.pk}"

    def as_policy(self) -> dict:
        return {
            "id": self.pk,
            "title": self.title,
            "kind": self.kind,
            "patterns": list(self.patterns),
            "description": self.description,
        }


class ProposalRevision(models.Model):
    """One saved text of a proposal: revision 1 is the submission, each edit of the draft adds the next.

    Kept so an edited draft's history can be read and diffed; ``content_hash`` is that revision's spec hash.
    """

    proposal = models.ForeignKey(Proposal, on_delete=models.CASCADE, related_name="revisions")
    number = models.PositiveIntegerField()
    title = models.CharField(max_length=200)
    body = models.TextField(blank=True)
    spec = models.JSONField()
    content_hash = models.CharField(max_length=64)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["proposal", "number"]
        constraints = [
            models.UniqueConstraint(fields=["proposal", "number"], name="gov_revision_unique_number"),
        ]

    def __str__(self) -> str:
        return f"#{self.proposal_id} revision {self.number}"


class Delegation(models.Model):
    """A member lets another vote for them, on every proposal (``kind`` empty) or on one kind of proposal.

    A delegation for a kind wins over the overall one. Chains are refused when a delegation is made
    (a delegate never delegates the same topic onwards), so there are no cycles and no transitive weight.
    """

    delegator = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="delegations")
    delegate = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="delegated_to_me")
    kind = models.CharField(max_length=16, blank=True, choices=Proposal.Kind.choices)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["kind", "id"]
        constraints = [
            models.UniqueConstraint(fields=["delegator", "kind"], name="gov_delegation_one_per_topic"),
            models.CheckConstraint(condition=~models.Q(delegator=models.F("delegate")), name="gov_delegation_not_self"),
            models.CheckConstraint(
                condition=models.Q(kind__in=["", "training", "guardrail"]), name="gov_delegation_kind_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.delegator} -> {self.delegate} ({self.kind or 'all'})"

    @property
    def topic(self) -> str:
        return f"{Proposal.Kind(self.kind).label} proposals" if self.kind else "all proposals"


class Notification(models.Model):
    """Something a member should see: shown in the bell until read, and e-mailed if they asked for it."""

    class Kind(models.TextChoices):
        PROPOSAL_OPENED = "proposal_opened", "A proposal opens for votes"
        PROPOSAL_CLOSED = "proposal_closed", "A proposal I voted on or wrote closes"
        PROPOSAL_APPROVED = "proposal_approved", "A training proposal is approved or vetoed"
        MENTION = "mention", "Someone mentions me in a comment"
        DELEGATION = "delegation", "Someone delegates their vote to me"
        RUN_FINISHED = "run_finished", "A training run I voted for finishes"
        WORKER_OFFLINE = "worker_offline", "One of my workers goes offline"
        WORKER_SUSPENDED = "worker_suspended", "One of my workers is suspended"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="notifications")
    kind = models.CharField(max_length=24, choices=Kind.choices)
    text = models.CharField(max_length=300)
    url = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    read_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["user", "read_at"], name="gov_notification_unread")]

    def __str__(self) -> str:
        return f"{self.user}: {self.text}"


class NotificationPreference(models.Model):
    """A member's choice for one kind of notification; without a row the defaults of ``notify`` apply."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    kind = models.CharField(max_length=24, choices=Notification.Kind.choices)
    in_app = models.BooleanField(default=True)
    email = models.BooleanField(default=False)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "kind"], name="gov_notification_pref_unique")]

    def __str__(self) -> str:
        return f"{self.user}: {self.kind}"
