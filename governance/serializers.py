"""Input and output shapes of the governance API (and the forms, which validate through the same specs)."""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from governance.markdown import render_markdown
from governance.models import Proposal, Vote
from governance.selectors import annotated_tally
from governance.specs import spec_normalise


class ProposalCreateInput(serializers.Serializer):
    kind = serializers.ChoiceField(choices=Proposal.Kind.choices)
    title = serializers.CharField(min_length=3, max_length=200)
    body = serializers.CharField(required=False, allow_blank=True, default="", max_length=20_000,
                                 trim_whitespace=False, help_text="Markdown.")
    spec = serializers.JSONField(
        help_text="The training spec or guardrail spec (see the contract); omitted fields get their defaults."
    )
    open = serializers.BooleanField(default=True, help_text="Open the vote at once (otherwise stays a draft).")
    voting_hours = serializers.FloatField(
        required=False, allow_null=True, default=None,
        help_text="The voting window in hours, within AGORA_VOTING_MIN_HOURS..AGORA_VOTING_MAX_HOURS; "
        "omitted: AGORA_VOTING_PERIOD_HOURS.",
    )

    def validate_spec(self, value):
        # Validated here, beside title and kind, so every bad field is reported at once; the service
        # normalises again (a no-op on a normalised spec) and checks what needs the database.
        kind = self.initial_data.get("kind")
        if kind not in Proposal.Kind.values:
            return value
        try:
            return spec_normalise(kind=kind, spec=value)
        except serializers.ValidationError as exc:
            raise serializers.ValidationError(exc.detail["spec"]) from None


class VoteInput(serializers.Serializer):
    choice = serializers.ChoiceField(choices=Vote.Choice.choices)


class VetoInput(serializers.Serializer):
    reason = serializers.CharField(max_length=2000, help_text="Published in the ledger.")


class CommentInput(serializers.Serializer):
    body = serializers.CharField(max_length=5000, help_text="Markdown; @username notifies that member.")
    parent = serializers.IntegerField(required=False, allow_null=True, default=None,
                                      help_text="The id of the comment this replies to.")


class CloseInput(serializers.Serializer):
    reason = serializers.CharField(max_length=500, help_text="Published in the ledger.")


class DelegationInput(serializers.Serializer):
    delegate = serializers.CharField(max_length=150, help_text="The username of the member who votes for you.")
    kind = serializers.ChoiceField(
        choices=[("", "all proposals"), *Proposal.Kind.choices], required=False, allow_blank=True, default="",
        help_text="Empty: every proposal; a kind: only proposals of that kind (wins over the overall one).",
    )


class DelegationOutput(serializers.Serializer):
    delegator = serializers.CharField(source="delegator.username")
    delegate = serializers.CharField(source="delegate.username")
    kind = serializers.CharField()
    created_at = serializers.DateTimeField()


class TallyOutput(serializers.Serializer):
    yes = serializers.FloatField()
    no = serializers.FloatField()
    abstain = serializers.FloatField()
    total = serializers.FloatField()
    votes = serializers.IntegerField()
    quorum = serializers.FloatField(allow_null=True)
    threshold = serializers.FloatField(allow_null=True)
    quorum_reached = serializers.BooleanField()
    passing = serializers.BooleanField()
    yes_share = serializers.FloatField(allow_null=True)


class ProposalListOutput(serializers.ModelSerializer):
    author = serializers.CharField(source="author.username")
    tally = serializers.SerializerMethodField()
    my_vote = serializers.SerializerMethodField()
    url = serializers.CharField(source="get_absolute_url")

    class Meta:
        model = Proposal
        fields = ["id", "kind", "status", "title", "author", "content_hash", "created_at", "opens_at", "closes_at",
                  "tally", "my_vote", "url"]

    @extend_schema_field(TallyOutput)
    def get_tally(self, obj) -> dict:
        return annotated_tally(obj).as_dict()

    @extend_schema_field(serializers.ChoiceField(choices=Vote.Choice.choices, allow_null=True))
    def get_my_vote(self, obj):
        return getattr(obj, "my_choice", None)


class ProposalDetailOutput(ProposalListOutput):
    body_html = serializers.SerializerMethodField()
    quorum = serializers.FloatField(allow_null=True)
    threshold = serializers.FloatField(allow_null=True)
    decided_by = serializers.CharField(source="decided_by.username", allow_null=True, default=None)

    class Meta(ProposalListOutput.Meta):
        fields = ProposalListOutput.Meta.fields + [
            "body", "body_html", "spec", "quorum", "threshold", "closed_at", "decided_at", "decided_by",
            "veto_reason", "enacted_at", "outcome", "eligibility_rule", "eligible_voters", "close_reason",
        ]

    @extend_schema_field(OpenApiTypes.STR)
    def get_body_html(self, obj) -> str:
        return render_markdown(obj.body)


class VoteOutput(serializers.ModelSerializer):
    voter = serializers.CharField(source="voter.username")
    weight = serializers.FloatField()
    via = serializers.CharField(source="via.username", allow_null=True, default=None,
                                help_text="The delegate who cast this vote for the voter; null for their own vote.")

    class Meta:
        model = Vote
        fields = ["voter", "choice", "weight", "via", "created_at", "updated_at"]


class VoteResultOutput(serializers.Serializer):
    vote = VoteOutput()
    tally = TallyOutput()


class CommentOutput(serializers.Serializer):
    id = serializers.IntegerField()
    author = serializers.CharField(source="author.username")
    body = serializers.CharField()
    body_html = serializers.SerializerMethodField()
    created_at = serializers.DateTimeField()

    @extend_schema_field(OpenApiTypes.STR)
    def get_body_html(self, obj) -> str:
        return render_markdown(obj.body)


class NotificationOutput(serializers.Serializer):
    id = serializers.IntegerField()
    kind = serializers.CharField()
    text = serializers.CharField()
    url = serializers.CharField()
    created_at = serializers.DateTimeField()
    read_at = serializers.DateTimeField(allow_null=True)


class NotificationReadInput(serializers.Serializer):
    ids = serializers.ListField(child=serializers.IntegerField(min_value=1), required=False, max_length=100,
                                help_text="The notifications to mark read; omitted: all of yours.")
