"""Member API for proposals, votes, comments and guardrails. Thin: input serializer -> service -> output."""

from __future__ import annotations

from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.permissions import AllowAny, IsAdminUser, IsAuthenticated, IsAuthenticatedOrReadOnly
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import APIView

from core.ratelimit import per_account, per_address, signed_in_account
from governance import selectors, services
from governance.models import Guardrail, Proposal
from governance.serializers import (
    CloseInput,
    CommentInput,
    CommentOutput,
    DelegationInput,
    DelegationOutput,
    NotificationOutput,
    NotificationReadInput,
    ProposalCreateInput,
    ProposalDetailOutput,
    ProposalListOutput,
    VetoInput,
    VoteInput,
    VoteResultOutput,
)

# A 4xx declared with a description only gets the project's error body in the schema (agora.schema).
_CONFLICT = OpenApiResponse(description="The proposal's state does not allow this (e.g. voting has closed).")


def _detail(request, pk: int) -> Response:
    proposal = selectors.proposal_get(pk=pk, user=request.user)
    return Response(ProposalDetailOutput(proposal).data)


def _proposal(pk: int) -> Proposal:
    return get_object_or_404(Proposal, pk=pk)


class ProposalPagination(api_settings.DEFAULT_PAGINATION_CLASS):
    default_limit = 20
    max_limit = 100


class ProposalListCreateApi(APIView):
    permission_classes = [IsAuthenticatedOrReadOnly]
    pagination_class = ProposalPagination  # also tells the schema that the list is paginated

    class FilterInput(serializers.Serializer):
        kind = serializers.ChoiceField(choices=Proposal.Kind.choices, required=False, default="")
        status = serializers.ChoiceField(choices=Proposal.Status.choices, required=False, default="")
        q = serializers.CharField(required=False, default="", max_length=200)

    @extend_schema(
        parameters=[
            OpenApiParameter("kind", str, enum=Proposal.Kind.values),
            OpenApiParameter("status", str, enum=Proposal.Status.values),
            OpenApiParameter("q", {"type": "string", "maxLength": 200}, description="search in title and body"),
        ],
        responses=ProposalListOutput(many=True),
    )
    def get(self, request):
        params = self.FilterInput(data=request.query_params)
        params.is_valid(raise_exception=True)
        qs = selectors.proposals_list(**params.validated_data, user=request.user)
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(qs, request, view=self)
        return paginator.get_paginated_response(ProposalListOutput(page, many=True).data)

    @extend_schema(request=ProposalCreateInput, responses={201: ProposalDetailOutput})
    def post(self, request):
        data = ProposalCreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        proposal = services.proposal_submit(
            author=request.user,
            kind=values["kind"],
            title=values["title"],
            body=values["body"],
            spec=values["spec"],
            open_now=values["open"],
            voting_hours=values.get("voting_hours"),
        )
        response = _detail(request, proposal.pk)
        response.status_code = status.HTTP_201_CREATED
        return response


class ProposalDetailApi(APIView):
    permission_classes = [AllowAny]

    @extend_schema(responses=ProposalDetailOutput)
    def get(self, request, pk: int):
        try:
            return _detail(request, pk)
        except Proposal.DoesNotExist:
            return Response({"error": "not_found", "detail": "No such proposal."}, status=404)


class ProposalVoteApi(APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(request=VoteInput, responses={200: VoteResultOutput, 409: _CONFLICT})
    def post(self, request, pk: int):
        data = VoteInput(data=request.data)
        data.is_valid(raise_exception=True)
        proposal = _proposal(pk)
        vote = services.vote_cast(proposal=proposal, voter=request.user, choice=data.validated_data["choice"])
        tally = selectors.proposal_tally(proposal=proposal)
        return Response(VoteResultOutput({"vote": vote, "tally": tally.as_dict()}).data)


class ProposalOpenApi(APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(request=None, responses={200: ProposalDetailOutput, 409: _CONFLICT})
    def post(self, request, pk: int):
        services.proposal_open(proposal=_proposal(pk), by=request.user)
        return _detail(request, pk)


class ProposalCancelApi(APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(request=None, responses={200: ProposalDetailOutput, 409: _CONFLICT})
    def post(self, request, pk: int):
        services.proposal_cancel(proposal=_proposal(pk), by=request.user)
        return _detail(request, pk)


class ProposalApproveApi(APIView):
    permission_classes = [IsAdminUser]

    @extend_schema(request=None, responses={200: ProposalDetailOutput, 409: _CONFLICT})
    def post(self, request, pk: int):
        services.proposal_approve(proposal=_proposal(pk), by=request.user)
        return _detail(request, pk)


class ProposalVetoApi(APIView):
    permission_classes = [IsAdminUser]

    @extend_schema(request=VetoInput, responses={200: ProposalDetailOutput, 409: _CONFLICT})
    def post(self, request, pk: int):
        data = VetoInput(data=request.data)
        data.is_valid(raise_exception=True)
        services.proposal_veto(proposal=_proposal(pk), by=request.user, reason=data.validated_data["reason"])
        return _detail(request, pk)


class ProposalCommentsApi(APIView):
    permission_classes = [IsAuthenticatedOrReadOnly]
    # Posting is limited per address and per account; reading is not.
    throttle_classes = [per_address("comment_address"), per_account("comment_account", signed_in_account)]

    @extend_schema(responses=CommentOutput(many=True))
    def get(self, request, pk: int):
        proposal = _proposal(pk)
        return Response(CommentOutput(selectors.proposal_comments(proposal=proposal), many=True).data)

    @extend_schema(request=CommentInput, responses={201: CommentOutput, 409: _CONFLICT})
    def post(self, request, pk: int):
        data = CommentInput(data=request.data)
        data.is_valid(raise_exception=True)
        comment = services.comment_post(
            proposal=_proposal(pk), author=request.user, body=data.validated_data["body"],
            parent_id=data.validated_data.get("parent"),
        )
        return Response(CommentOutput(comment).data, status=status.HTTP_201_CREATED)


class GuardrailListApi(APIView):
    """Guardrails in force (the shape agents receive), optionally of one kind."""

    permission_classes = [AllowAny]

    @extend_schema(
        parameters=[OpenApiParameter("kind", str, enum=Guardrail.Kind.values)],
        responses=inline_serializer(
            "GuardrailPolicy",
            {
                "id": serializers.IntegerField(),
                "title": serializers.CharField(),
                "kind": serializers.ChoiceField(choices=Guardrail.Kind.choices),
                "patterns": serializers.ListField(child=serializers.CharField()),
                "description": serializers.CharField(),
            },
            many=True,
        ),
    )
    def get(self, request):
        kind = request.query_params.get("kind") or None
        if kind is not None and kind not in Guardrail.Kind.values:
            raise serializers.ValidationError({"kind": [f"Must be one of {', '.join(Guardrail.Kind.values)}."]})
        return Response(selectors.guardrails_active(kind=kind))



class ProposalCloseApi(APIView):
    """Staff close an active vote before its window ends, with a public reason; closing twice is harmless."""

    permission_classes = [IsAdminUser]

    @extend_schema(request=CloseInput, responses={200: ProposalDetailOutput, 409: _CONFLICT})
    def post(self, request, pk: int):
        data = CloseInput(data=request.data)
        data.is_valid(raise_exception=True)
        services.proposal_close_early(proposal=_proposal(pk), by=request.user, reason=data.validated_data["reason"])
        return _detail(request, pk)


class DelegationListApi(APIView):
    """Your delegations (``mine``) and who delegates to you (``to_me``); POST sets one (per topic)."""

    permission_classes = [IsAuthenticated]

    @extend_schema(responses=inline_serializer("Delegations", {
        "mine": DelegationOutput(many=True), "to_me": DelegationOutput(many=True)}))
    def get(self, request):
        rows = selectors.delegations_of(user=request.user)
        return Response({key: DelegationOutput(value, many=True).data for key, value in rows.items()})

    @extend_schema(request=DelegationInput, responses={201: DelegationOutput})
    def post(self, request):
        data = DelegationInput(data=request.data)
        data.is_valid(raise_exception=True)
        from django.contrib.auth import get_user_model

        delegate = get_user_model().objects.filter(username=data.validated_data["delegate"], is_active=True).first()
        delegation = services.delegation_set(delegator=request.user, delegate=delegate, kind=data.validated_data["kind"])
        return Response(DelegationOutput(delegation).data, status=status.HTTP_201_CREATED)


class DelegationRevokeApi(APIView):
    """Revoke your delegation for a topic: ``all``, ``training`` or ``guardrail``."""

    permission_classes = [IsAuthenticated]

    @extend_schema(request=None, responses={204: None, 404: OpenApiResponse(description="No such delegation.")})
    def delete(self, request, topic: str):
        if topic not in ("all", *Proposal.Kind.values):
            raise serializers.ValidationError({"topic": [f"Must be all or one of {', '.join(Proposal.Kind.values)}."]})
        if not services.delegation_revoke(delegator=request.user, kind="" if topic == "all" else topic):
            return Response({"error": "not_found", "detail": "You have no delegation for this topic."}, status=404)
        return Response(status=status.HTTP_204_NO_CONTENT)


class NotificationListApi(APIView):
    """Your notifications, newest first (``?unread=1`` for the unread ones only)."""

    permission_classes = [IsAuthenticated]
    pagination_class = ProposalPagination

    @extend_schema(parameters=[OpenApiParameter("unread", bool)], responses=NotificationOutput(many=True))
    def get(self, request):
        qs = selectors.notifications_for(user=request.user)
        if request.query_params.get("unread") in ("1", "true"):
            qs = qs.filter(read_at__isnull=True)
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(qs, request, view=self)
        return paginator.get_paginated_response(NotificationOutput(page, many=True).data)


class NotificationReadApi(APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(request=NotificationReadInput, responses=inline_serializer("NotificationsRead", {
        "marked_read": serializers.IntegerField()}))
    def post(self, request):
        from governance.notifications import notifications_mark_read

        data = NotificationReadInput(data=request.data)
        data.is_valid(raise_exception=True)
        marked = notifications_mark_read(user=request.user, ids=data.validated_data.get("ids"))
        return Response({"marked_read": marked})
