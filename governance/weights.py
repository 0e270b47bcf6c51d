"""Vote weight strategies: callables ``(user) -> Decimal`` named by ``settings.AGORA_VOTE_WEIGHT_STRATEGY``."""

from decimal import Decimal

from django.conf import settings
from django.utils.module_loading import import_string


def one_member_one_vote(user) -> Decimal:
    return Decimal(1)


def vote_weight(user) -> Decimal:
    """Resolve the configured strategy at call time (so settings overrides apply) and normalise its answer."""
    strategy = import_string(settings.AGORA_VOTE_WEIGHT_STRATEGY)
    weight = Decimal(str(strategy(user)))
    if not weight.is_finite() or weight < 0:
        raise ValueError(f"vote weight strategy returned an invalid weight: {weight}")
    return weight.quantize(Decimal("0.0001"))
