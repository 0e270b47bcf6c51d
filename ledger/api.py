from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from ledger.selectors import entries_list, ledger_head

PAGE_LIMIT = 500
SEQ_MAX = 2**63 - 1  # the column is a bigint; a larger ``after`` is a 400, not a database error


class EntrySerializer(serializers.Serializer):
    seq = serializers.IntegerField()
    created_at = serializers.CharField()
    actor = serializers.CharField()
    action = serializers.CharField()
    subject = serializers.CharField()
    payload = serializers.JSONField()
    prev_hash = serializers.CharField()
    hash = serializers.CharField()


class HeadSerializer(serializers.Serializer):
    seq = serializers.IntegerField(help_text="seq of the last entry (0 when the ledger is empty)")
    hash = serializers.CharField(help_text="hash of the last entry (64 zeros when the ledger is empty)")


class LedgerPageSerializer(serializers.Serializer):
    entries = EntrySerializer(many=True)
    next_after = serializers.IntegerField(allow_null=True)
    head = HeadSerializer(help_text="the head when this page was read: an export that stops short of it is "
                                    "truncated (`python -m ledger.verify --head SEQ:HASH`)")


class LedgerListApi(APIView):
    """Entries in seq order after ``after``; follow ``next_after`` until it is null to export the chain."""

    permission_classes = [AllowAny]

    class FilterSerializer(serializers.Serializer):
        after = serializers.IntegerField(min_value=0, max_value=SEQ_MAX, default=0)
        limit = serializers.IntegerField(min_value=1, max_value=PAGE_LIMIT, default=PAGE_LIMIT)
        action = serializers.CharField(required=False, default="", max_length=64)
        subject = serializers.CharField(required=False, default="", max_length=64)

    @extend_schema(
        parameters=[
            OpenApiParameter("after", {"type": "integer", "minimum": 0, "maximum": SEQ_MAX, "default": 0},
                             description="return entries with seq greater than this"),
            OpenApiParameter("limit", {"type": "integer", "minimum": 1, "maximum": PAGE_LIMIT, "default": PAGE_LIMIT},
                             description=f"at most this many (≤ {PAGE_LIMIT})"),
            OpenApiParameter("action", {"type": "string", "maxLength": 64}, description="only actions starting with this, e.g. `vote.`"),
            OpenApiParameter("subject", {"type": "string", "maxLength": 64}, description="only entries about this subject, e.g. `proposal:3`"),
        ],
        responses=LedgerPageSerializer,
    )
    def get(self, request):
        params = self.FilterSerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        limit = params.validated_data.pop("limit")
        head = ledger_head()  # read first: every entry up to it is on this page or a later one
        rows = list(entries_list(**params.validated_data)[: limit + 1])
        more = len(rows) > limit
        rows = rows[:limit]
        return Response(
            {
                "entries": [row.as_chain_dict() for row in rows],
                "next_after": rows[-1].seq if more else None,
                "head": head,
            }
        )


class LedgerHeadApi(APIView):
    """The published head. Keep it (or compare it with someone else's copy): a later export or database
    that does not reach this seq with this hash was truncated or rewritten."""

    permission_classes = [AllowAny]

    @extend_schema(responses=HeadSerializer)
    def get(self, request):
        return Response(ledger_head())
