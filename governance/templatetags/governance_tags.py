from django import template
from django.utils.safestring import mark_safe

from governance.markdown import render_markdown

register = template.Library()


@register.filter
def markdown(text: str) -> str:
    # render_markdown sanitises with nh3, which is what makes mark_safe correct here.
    return mark_safe(render_markdown(text))  # noqa: S308


@register.filter
def percent(part, whole) -> float:
    try:
        return round(float(part) * 100 / float(whole), 1) if whole else 0.0
    except (TypeError, ValueError):
        return 0.0


@register.filter
def weight(value) -> str:
    """Vote weights are Decimals with four places; show 3 rather than 3.0000."""
    if value is None:
        return "0"
    text = f"{value:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


@register.filter
def hours(period) -> str:
    """A duration as a number of hours: 0.5, 24, 72."""
    if period is None:
        return ""
    return f"{period.total_seconds() / 3600:g}"
