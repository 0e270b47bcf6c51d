"""Numbers people read look the same everywhere, with their unit."""

from decimal import Decimal

import pytest

from agora.templatetags.agora_format import count, credits, credits_number, hours


@pytest.mark.parametrize(("value", "shown"), [
    (Decimal("430.080000000000"), "430.08 credits"), (Decimal("0.0000"), "0.00 credits"),
    (Decimal("168.960"), "168.96 credits"), (168.96, "168.96 credits"), (None, "0.00 credits"),
    (Decimal("1"), "1.00 credit"), (Decimal("1234567.005"), "1,234,567.01 credits"), ("NaN", "0.00 credits"),
])
def test_credits_have_two_decimals_and_a_unit(value, shown):
    assert credits(value) == shown
    assert credits_number(value) == shown.split(" ")[0]


@pytest.mark.parametrize(("value", "shown"), [
    (24.0, "24 hours"), (1, "1 hour"), (1.5, "1.5 hours"), (0.5, "30 minutes"), (72, "3 days"), (None, ""),
])
def test_hours_read_as_people_say_them(value, shown):
    assert hours(value) == shown


def test_counts_agree_with_their_noun():
    assert count(1, "guardrail") == "1 guardrail"
    assert count(3, "guardrail") == "3 guardrails"
    assert count([1, 2], "entry,entries") == "2 entries"
    assert count(1200, "vote") == "1,200 votes"


def test_every_template_shows_credits_through_the_credits_filters():
    import re
    from pathlib import Path

    raw = re.compile(r"credit[a-z_.]*\s*\|\s*(floatformat|stringformat|intcomma)")
    templates = list((Path(__file__).resolve().parents[2] / "templates").rglob("*.html"))
    assert len(templates) > 20
    offenders = [f"{path}:{n}" for path in templates
                 for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if raw.search(line)]
    assert offenders == [], "credits shown without |credits or |credits_number: " + ", ".join(offenders)
