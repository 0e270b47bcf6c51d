from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from ledger.selectors import entries_list, ledger_head

PAGE_LIMIT = 500


class EntrySerializer(serializers.Serializer):
    seq = serializers.IntegerField()
    created_at = serializers.CharField()
    actor = serializers.CharField()
    action = serializers.CharField()
    subject = serializers.CharField()
    payload = serializers.JSONField()
    prev_hash = serializers.CharField()
    hash = serializers.CharField()


class LedgerPageSerializer(serializers.Serializer):
    entries = EntrySerializer(many=True)
    next_after = serializers.IntegerField(allow_null=True)


class HeadSerializer(serializers.Serializer):
    seq = serializers.IntegerField()
    hash = serializers.CharField()


class LedgerListApi(APIView):
    """Entries in seq order after ``after``; follow ``next_after`` until it is null to export the chain."""

    permission_classes = [AllowAny]

    class FilterSerializer(serializers.Serializer):
        after = serializers.IntegerField(min_value=0, default=0)
        limit = serializers.IntegerField(min_value=1, max_value=PAGE_LIMIT, default=PAGE_LIMIT)
        action = serializers.CharField(required=False, default="")
        subject = serializers.CharField(required=False, default="")

    @extend_schema(
        parameters=[
            OpenApiParameter("after", int, description="return entries with seq greater than this"),
            OpenApiParameter("limit", int, description=f"at most this many (≤ {PAGE_LIMIT})"),
            OpenApiParameter("action", str, description="only actions starting with this, e.g. `vote.`"),
            OpenApiParameter("subject", str, description="only entries about this subject, e.g. `proposal:3`"),
        ],
        responses=LedgerPageSerializer,
    )
    def get(self, request):
        params = self.FilterSerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        limit = params.validated_data.pop("limit")
        rows = list(entries_list(**params.validated_data)[: limit + 1])
        more = len(rows) > limit
        rows = rows[:limit]
        return Response(
            {
                "entries": [row.as_chain_dict() for row in rows],
                "next_after": rows[-1].seq if more else None,
            }
        )


class LedgerHeadApi(APIView):
    permission_classes = [AllowAny]

    @extend_schema(responses=HeadSerializer)
    def get(self, request):
        return Response(ledger_head())
