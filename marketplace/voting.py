"""Compute-weighted voting: a vote weighs ``1 + sqrt(credits) / 10``.

Every member keeps at least one full vote; verified compute adds weight sub-linearly, so a hundred times
the compute buys ten times the extra weight, not a hundred: 0 credits -> 1, 100 -> 2, 2,500 -> 6,
10,000 -> 11. Only credits that were granted (for contributions the server accepted) count.
Select it with ``AGORA_VOTE_WEIGHT_STRATEGY=marketplace.voting.compute_weighted``.
"""

from __future__ import annotations

from decimal import ROUND_DOWN, Decimal

from django.db.models import Sum

from marketplace.models import CreditGrant
from marketplace.selectors import member_credits


def weight_for_credits(credits: Decimal) -> Decimal:
    credits = max(Decimal(credits), Decimal("0"))
    return (Decimal(1) + credits.sqrt() / Decimal(10)).quantize(Decimal("0.0001"), rounding=ROUND_DOWN)


def compute_weighted(user) -> Decimal:
    return weight_for_credits(member_credits(user=user))


def members_with_credits(*, minimum: Decimal):
    """Ids of members whose workers hold at least ``minimum`` granted credits (the ``credits:<N>`` voter
    eligibility term; a subquery, so counting eligible voters stays one query)."""
    return (
        CreditGrant.objects.values("worker__owner")
        .annotate(total=Sum("amount"))
        .filter(total__gte=minimum)
        .values("worker__owner")
    )
