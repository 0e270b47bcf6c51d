"""One way to show numbers people read: credits, durations and counts with their units."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

from django import template

register = template.Library()


def _decimal(value) -> Decimal | None:
    if value is None or value == "":
        return None
    try:
        number = Decimal(str(value))
    except (InvalidOperation, ValueError, TypeError):
        return None
    return number if number.is_finite() else None


@register.filter
def credits(value) -> str:
    """Compute credits, always two decimals with thousands separators and the unit: ``1,234.50 credits``."""
    number = _decimal(value)
    if number is None:
        number = Decimal(0)
    number = number.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    unit = "credit" if number == 1 else "credits"
    return f"{number:,.2f} {unit}"


@register.filter
def credits_number(value) -> str:
    """The same figure without the unit, for table columns whose header names it."""
    return credits(value).rsplit(" ", 1)[0]


@register.filter
def hours(value) -> str:
    """A duration given in hours, as people say it: ``24 hours``, ``1 hour``, ``90 minutes``, ``2 days``."""
    number = _decimal(value)
    if number is None:
        return ""
    if number < 1:
        minutes = int((number * 60).to_integral_value(rounding=ROUND_HALF_UP))
        return f"{minutes} minute{'' if minutes == 1 else 's'}"
    if number >= 48 and number % 24 == 0:
        days = int(number / 24)
        return f"{days} days"
    shown = number.quantize(Decimal("0.1"), rounding=ROUND_HALF_UP).normalize()
    shown = shown.quantize(Decimal(1)) if shown == shown.to_integral_value() else shown
    return f"{shown} hour{'' if shown == 1 else 's'}"


@register.filter
def count(value, noun: str) -> str:
    """``3|count:"guardrail"`` → ``3 guardrails``; ``1|count:"guardrail"`` → ``1 guardrail``.
    An irregular plural is given after a comma: ``n|count:"entry,entries"``."""
    try:
        n = int(value if not hasattr(value, "__len__") else len(value))
    except (TypeError, ValueError):
        n = 0
    singular, _, plural = noun.partition(",")
    return f"{n:,} {singular if n == 1 else (plural or singular + 's')}"


@register.filter
def duration_words(value) -> str:
    """A timedelta (or seconds) as people say it: ``45 s``, ``12 min``, ``2 h 5 min``, ``3 days 4 h``."""
    seconds = getattr(value, "total_seconds", lambda: value)()
    number = _decimal(seconds)
    if number is None:
        return ""
    total = int(number.to_integral_value(rounding=ROUND_HALF_UP))
    if total < 60:
        return f"{total} s"
    minutes, hours_, days = total // 60, total // 3600, total // 86400
    if total < 3600:
        return f"{minutes} min"
    if total < 86400:
        rest = minutes - hours_ * 60
        return f"{hours_} h" + (f" {rest} min" if rest else "")
    rest = hours_ - days * 24
    return f"{days} day{'' if days == 1 else 's'}" + (f" {rest} h" if rest else "")
