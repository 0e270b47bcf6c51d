from datetime import timedelta
from decimal import Decimal

import factory
from django.utils import timezone

from governance.models import Guardrail, Proposal, Vote
from governance.specs import content_hash, spec_normalise
from tests.factories import UserFactory


def training_spec(**sections) -> dict:
    return spec_normalise(kind="training", spec=sections)


def guardrail_spec(**fields) -> dict:
    spec = {"action": "adopt", "kind": "data_filter", "patterns": [r"\bsecret\b"], "description": "No secrets."}
    spec.update(fields)
    return spec_normalise(kind="guardrail", spec=spec)


class ProposalFactory(factory.django.DjangoModelFactory):
    """A proposal stored directly (for tests that need one in a given state); real ones go through services."""

    class Meta:
        model = Proposal

    kind = Proposal.Kind.TRAINING
    title = factory.Sequence(lambda n: f"Proposal number {n}")
    body = "Let us train."
    author = factory.SubFactory(UserFactory)
    spec = factory.LazyAttribute(lambda o: training_spec() if o.kind == Proposal.Kind.TRAINING else guardrail_spec())
    content_hash = factory.LazyAttribute(lambda o: content_hash(o.spec))
    status = Proposal.Status.DRAFT
    created_at = factory.LazyFunction(timezone.now)

    @factory.lazy_attribute
    def opens_at(self):
        return None if self.status in ("draft",) else timezone.now() - timedelta(hours=1)

    @factory.lazy_attribute
    def closes_at(self):
        if self.opens_at is None:
            return None
        if self.status == Proposal.Status.ACTIVE:
            return self.opens_at + timedelta(days=3)
        return self.opens_at + timedelta(minutes=30)

    @factory.lazy_attribute
    def quorum(self):
        return None if self.opens_at is None else Decimal(3)

    @factory.lazy_attribute
    def threshold(self):
        return None if self.opens_at is None else Decimal("0.5")


class VoteFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Vote

    proposal = factory.SubFactory(ProposalFactory, status=Proposal.Status.ACTIVE)
    voter = factory.SubFactory(UserFactory)
    choice = Vote.Choice.YES
    weight = Decimal(1)


class GuardrailFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Guardrail

    proposal = factory.SubFactory(
        ProposalFactory, kind=Proposal.Kind.GUARDRAIL, status=Proposal.Status.ENACTED
    )
    title = factory.Sequence(lambda n: f"Guardrail {n}")
    kind = Guardrail.Kind.DATA_FILTER
    patterns = factory.LazyFunction(lambda: [r"\bsecret\b"])
    description = "No secrets."
    active = True
