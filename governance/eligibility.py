"""Who may vote: a verified e-mail address, always, plus the terms of ``AGORA_VOTER_ELIGIBILITY``.

The rule is a comma-separated list of terms that must all hold; a term may offer alternatives with ``|``
(``verified_email,account_age:7d|staff_approved``: verified, and either a week old or approved by staff).

==================  ===========================================================================
``verified_email``  a verified e-mail address (django-allauth); implied by every rule
``account_age:7d``  the account existed that long when the vote opened (``d``, ``h`` or ``m``)
``credits:10``      at least that many verified compute credits (granted for accepted work)
``staff_approved``  a staff member approved the account as a voting member (staff count as approved)
==================  ===========================================================================

Each term is written twice, as a check on one member (with the evidence that goes into the ledger and the
sentence that tells an ineligible member what is missing) and as a query over all members (to count the
eligible voters that the quorum is a fraction of); ``tests/governance/test_eligibility.py`` holds the two
together. Account age is measured at the moment the vote opened, so accounts made after a proposal
opens can never vote on it; the rule itself is frozen onto the proposal when it opens.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from functools import lru_cache

from allauth.account.models import EmailAddress
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ImproperlyConfigured
from django.db.models import Exists, OuterRef, Q, QuerySet
from django.utils import timezone
from django.utils.module_loading import import_string

from governance.models import Proposal, VoterApproval

_UNITS = {"d": ("day", timedelta(days=1)), "h": ("hour", timedelta(hours=1)), "m": ("minute", timedelta(minutes=1))}
_AGE = re.compile(r"^(\d{1,6})([dhm])$")
_CREDITS = re.compile(r"^\d{1,12}(\.\d{1,4})?$")


def _plural(n: int, unit: str) -> str:
    return f"{n} {unit}{'' if n == 1 else 's'}"


@dataclass(frozen=True)
class Term:
    kind: str
    argument: str = ""

    def __str__(self) -> str:
        return f"{self.kind}:{self.argument}" if self.argument else self.kind

    # --- parameters -------------------------------------------------------------------------
    @property
    def age(self) -> timedelta:
        count, unit = _AGE.match(self.argument).groups()
        return int(count) * _UNITS[unit][1]

    @property
    def age_text(self) -> str:
        count, unit = _AGE.match(self.argument).groups()
        return _plural(int(count), _UNITS[unit][0])

    @property
    def credits(self) -> Decimal:
        return Decimal(self.argument)

    # --- one member -------------------------------------------------------------------------
    def check(self, user, *, at: datetime) -> tuple[bool, dict, str]:
        """(holds, evidence for the ledger, what the member still needs)."""
        if self.kind == "verified_email":
            ok = EmailAddress.objects.filter(user=user, verified=True).exists()
            return ok, {"verified_email": True}, "a verified e-mail address (use the link we sent, or send another)"
        if self.kind == "account_age":
            age = at - user.date_joined
            days = max(0, math.floor(age.total_seconds() / 86400))
            need = f"an account at least {self.age_text} old when the vote opened"
            if age < self.age:
                need += f" (yours was {_plural(days, 'day')} old)" if days else " (yours was newer than a day)"
            return age >= self.age, {"account_age_days": days}, need
        if self.kind == "credits":
            have = Decimal(import_string(settings.AGORA_MEMBER_CREDITS)(user=user))
            return (
                have >= self.credits,
                {"credits": _number(have)},
                f"at least {_number(self.credits)} verified compute credits (you have {_number(have)})",
            )
        if self.kind == "staff_approved":
            ok = user.is_staff or VoterApproval.objects.filter(user=user).exists()
            return ok, {"staff_approved": True}, "approval as a voting member by staff"
        raise AssertionError(self.kind)

    # --- every member -----------------------------------------------------------------------
    def query(self, *, at: datetime) -> Q:
        if self.kind == "verified_email":
            return Q(Exists(EmailAddress.objects.filter(user=OuterRef("pk"), verified=True)))
        if self.kind == "account_age":
            return Q(date_joined__lte=at - self.age)
        if self.kind == "credits":
            return Q(pk__in=import_string(settings.AGORA_MEMBERS_WITH_CREDITS)(minimum=self.credits))
        if self.kind == "staff_approved":
            return Q(is_staff=True) | Q(Exists(VoterApproval.objects.filter(user=OuterRef("pk"))))
        raise AssertionError(self.kind)


def _number(value: Decimal):
    value = Decimal(value)
    return int(value) if value == value.to_integral_value() else float(value)


def _term(text: str) -> Term:
    kind, _, argument = text.strip().partition(":")
    kind, argument = kind.strip(), argument.strip()
    if kind in ("verified_email", "staff_approved") and not argument:
        return Term(kind)
    if kind == "account_age" and _AGE.match(argument):
        return Term(kind, argument)
    if kind == "credits" and _CREDITS.match(argument):
        return Term(kind, argument)
    raise ImproperlyConfigured(
        f"AGORA_VOTER_ELIGIBILITY: {text.strip()!r} is not a term (verified_email, account_age:<N>d|h|m, "
        "credits:<N>, staff_approved)"
    )


@dataclass(frozen=True)
class Rule:
    """All of ``groups`` must hold; a group holds when any of its terms does."""

    groups: tuple[tuple[Term, ...], ...]

    def __str__(self) -> str:
        return ",".join("|".join(str(term) for term in group) for group in self.groups)


@lru_cache(maxsize=32)
def parse_rule(text: str) -> Rule:
    """Parse a rule; a verified e-mail address is always required, listed or not."""
    groups = []
    for part in (text or "").split(","):
        if not part.strip():
            continue
        group = tuple(_term(item) for item in part.split("|"))
        if group not in groups:
            groups.append(group)
    verified = (Term("verified_email"),)
    if verified not in groups:
        groups.insert(0, verified)
    return Rule(tuple(groups))


@dataclass(frozen=True)
class Eligibility:
    eligible: bool
    rule: str
    basis: dict = field(default_factory=dict)  # what made the member eligible: recorded with each vote
    missing: tuple[str, ...] = ()  # what an ineligible member still needs, in words

    @property
    def reason(self) -> str:
        return "You cannot vote: you need " + "; and ".join(self.missing) + "."

    def as_ledger(self) -> dict:
        return {"rule": self.rule, **self.basis}


def current_rule() -> str:
    return str(parse_rule(settings.AGORA_VOTER_ELIGIBILITY))


def voter_eligibility(user, *, rule: str | None = None, at: datetime | None = None) -> Eligibility:
    """Whether ``user`` may vote under ``rule`` (default: the current setting), account age measured at ``at``."""
    parsed = parse_rule(rule if rule else settings.AGORA_VOTER_ELIGIBILITY)
    text = str(parsed)
    if user is None or not user.is_authenticated:
        return Eligibility(False, text, missing=("to log in",))
    if not user.is_active:
        return Eligibility(False, text, missing=("an active account",))
    at = at or timezone.now()
    basis: dict = {}
    missing: list[str] = []
    for group in parsed.groups:
        results = [term.check(user, at=at) for term in group]
        for ok, evidence, _ in results:
            if ok:
                basis.update(evidence)
        if not any(ok for ok, _, _ in results):
            needs = [need for _, _, need in results]
            missing.append(needs[0] if len(needs) == 1 else "either " + " or ".join(needs))
    return Eligibility(not missing, text, basis if not missing else {}, tuple(missing))


def proposal_voter_eligibility(*, proposal: Proposal, user) -> Eligibility:
    """Eligibility under the rule frozen onto the proposal, account age as of the moment it opened."""
    return voter_eligibility(user, rule=proposal.eligibility_rule or None, at=proposal.opens_at or timezone.now())


def eligible_voters(*, rule: str | None = None, at: datetime | None = None) -> QuerySet:
    """Every member who may vote under ``rule`` (active accounts only)."""
    parsed = parse_rule(rule if rule else settings.AGORA_VOTER_ELIGIBILITY)
    at = at or timezone.now()
    qs = get_user_model().objects.filter(is_active=True)
    for group in parsed.groups:
        condition = Q()
        for term in group:
            condition |= term.query(at=at)
        qs = qs.filter(condition)
    return qs


def quorum_for(*, eligible: int) -> Decimal:
    """``max(AGORA_QUORUM_MIN, ceil(AGORA_QUORUM_FRACTION × eligible))``, in vote weight."""
    fraction = Decimal(str(settings.AGORA_QUORUM_FRACTION))
    return Decimal(max(int(settings.AGORA_QUORUM_MIN), math.ceil(fraction * eligible)))
