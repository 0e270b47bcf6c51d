"""Compute credits (append-only, idempotent per reference), reliability, compute-weighted votes, and which
workers are available for a round."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.db import IntegrityError, transaction
from django.utils.module_loading import import_string

from ledger.models import Entry
from ledger.selectors import ledger_verify
from marketplace import presence
from marketplace.errors import MarketplaceError
from marketplace.models import CreditGrant, Worker, WorkerOutcome
from marketplace.selectors import member_compute, member_credits, workers_available
from marketplace.services import credit_grant, worker_record_outcome, worker_revoke, worker_suspend
from marketplace.voting import compute_weighted, weight_for_credits
from tests.marketplace.factories import WorkerFactory


def test_credit_grant_is_idempotent_per_reference(worker, member):
    first = credit_grant(worker=worker, amount=Decimal("2.5"), reason="round 1 accepted", reference="task:17")
    again = credit_grant(worker=worker, amount=Decimal("99"), reason="retry", reference="task:17")

    assert again.pk == first.pk and again.amount == Decimal("2.5")
    assert CreditGrant.objects.count() == 1
    assert member_credits(user=member) == Decimal("2.5")
    entry = Entry.objects.get(action="credit.granted")
    assert entry.subject == f"worker:{worker.pk}"
    assert entry.payload == {"worker_id": worker.pk, "amount": "2.5000", "reason": "round 1 accepted",
                             "reference": "task:17"}

    credit_grant(worker=worker, amount=Decimal("1"), reason="round 2 accepted", reference="task:18")
    assert member_credits(user=member) == Decimal("3.5")
    assert Entry.objects.filter(action="credit.granted").count() == 2
    assert ledger_verify().ok


def test_credit_grant_inside_a_callers_transaction_survives_a_duplicate(worker):
    with transaction.atomic():
        credit_grant(worker=worker, amount=Decimal("1"), reason="r", reference="task:1")
        credit_grant(worker=worker, amount=Decimal("1"), reason="r", reference="task:1")
    assert CreditGrant.objects.count() == 1


def test_credits_sum_over_the_members_workers_only(member, other_member):
    a, b = WorkerFactory(owner=member), WorkerFactory(owner=member)
    c = WorkerFactory(owner=other_member)
    credit_grant(worker=a, amount=Decimal("1.25"), reason="r", reference="task:1")
    credit_grant(worker=b, amount=Decimal("2"), reason="r", reference="task:2")
    credit_grant(worker=c, amount=Decimal("40"), reason="r", reference="task:3")
    assert member_credits(user=member) == Decimal("3.25")
    compute = member_compute(user=member)
    assert compute["credits"] == Decimal("3.25")
    assert {w.pk for w in compute["workers"]} == {a.pk, b.pk}
    assert all(w.live_state == "offline" for w in compute["workers"])


@pytest.mark.parametrize("amount", [Decimal("0"), Decimal("-1"), Decimal("NaN"), "lots"])
def test_credit_amount_must_be_positive(worker, amount):
    with pytest.raises(MarketplaceError):
        credit_grant(worker=worker, amount=amount, reason="r", reference="task:1")
    assert not CreditGrant.objects.exists()


def test_credit_grants_are_append_only(worker):
    grant = credit_grant(worker=worker, amount=Decimal("1"), reason="r", reference="task:1")
    grant.amount = Decimal("1000")
    with pytest.raises(TypeError):
        grant.save()
    with pytest.raises(TypeError):
        grant.delete()
    with pytest.raises(TypeError):
        CreditGrant.objects.filter(pk=grant.pk).update(amount=Decimal("1000"))
    with pytest.raises(TypeError):
        CreditGrant.objects.all().delete()
    # The database refuses a second grant for the same reference even when Python is bypassed.
    with pytest.raises(IntegrityError), transaction.atomic():
        CreditGrant.objects.bulk_create([CreditGrant(worker=worker, amount=Decimal("5"), reason="x",
                                                     reference="task:1")])
    assert CreditGrant.objects.get().amount == Decimal("1")


def test_credits_survive_revocation(worker, member):
    credit_grant(worker=worker, amount=Decimal("3"), reason="r", reference="task:1")
    worker_revoke(worker=worker, by=member)
    assert member_credits(user=member) == Decimal("3")


def test_reliability_decays_towards_recent_outcomes(worker):
    assert worker.reliability == 0.5
    worker = worker_record_outcome(worker=worker, valid=True, reference="task:1")
    assert worker.reliability == pytest.approx(0.55)
    worker = worker_record_outcome(worker=worker, valid=False, reference="task:2")
    assert worker.reliability == pytest.approx(0.495)
    # Recorded once per reference.
    worker = worker_record_outcome(worker=worker, valid=False, reference="task:2")
    assert worker.reliability == pytest.approx(0.495)
    for n in range(3, 13):
        worker = worker_record_outcome(worker=worker, valid=True, reference=f"task:{n}")
    assert worker.reliability == pytest.approx(1 - 0.505 * 0.9 ** 10)
    stored = Worker.objects.get(pk=worker.pk)
    assert (stored.tasks_valid, stored.tasks_invalid) == (11, 1)
    assert stored.reliability == pytest.approx(worker.reliability)
    assert WorkerOutcome.objects.filter(worker=worker).count() == 12


def test_a_run_of_failures_drives_reliability_down(worker):
    for n in range(20):
        worker = worker_record_outcome(worker=worker, valid=False, reference=f"task:{n}")
    assert worker.reliability == pytest.approx(0.5 * 0.9 ** 20)
    assert 0 <= worker.reliability < 0.07


@pytest.mark.parametrize(("credits", "weight"), [
    (Decimal("0"), Decimal("1")), (Decimal("1"), Decimal("1.1")), (Decimal("100"), Decimal("2")),
    (Decimal("2500"), Decimal("6")), (Decimal("10000"), Decimal("11")),
])
def test_weight_formula(credits, weight):
    assert weight_for_credits(credits) == weight


def test_weight_is_sub_linear():
    gains = [weight_for_credits(Decimal(c)) - 1 for c in (100, 200, 400, 800)]
    assert all(later < 2 * earlier for earlier, later in zip(gains, gains[1:], strict=False))


def test_compute_weighted_strategy(member, other_member, settings):
    settings.AGORA_VOTE_WEIGHT_STRATEGY = "marketplace.voting.compute_weighted"
    strategy = import_string(settings.AGORA_VOTE_WEIGHT_STRATEGY)
    worker = WorkerFactory(owner=member)
    credit_grant(worker=worker, amount=Decimal("400"), reason="r", reference="task:1")
    assert strategy(member) == Decimal("3")
    assert strategy(other_member) == Decimal("1")
    assert isinstance(compute_weighted(member), Decimal)


def _beat(worker, state):
    presence.presence_record(worker.pk, state=state, task_id=None, progress=None)


def test_workers_available(staff):
    big = WorkerFactory(gpus=[{"name": "A100", "memory_mb": 81920}])
    small = WorkerFactory(gpus=[{"name": "GTX 1060", "memory_mb": 6144}, {"name": "GTX 1060", "memory_mb": 6144}])
    cpu = WorkerFactory(gpus=[])
    busy = WorkerFactory()
    paused = WorkerFactory()
    silent = WorkerFactory()
    suspended = WorkerFactory()
    for w in (big, small, cpu, suspended):
        _beat(w, "idle")
    _beat(busy, "busy")
    _beat(paused, "paused")
    worker_suspend(worker=suspended, by=staff, reason="bad results")
    _beat(suspended, "idle")  # a stale write must not bring it back
    assert silent.pk  # never sent a heartbeat

    assert {w.pk for w in workers_available(min_vram_mb=0, allow_cpu=True)} == {big.pk, small.pk, cpu.pk}
    assert {w.pk for w in workers_available(min_vram_mb=0, allow_cpu=False)} == {big.pk, small.pk}
    assert {w.pk for w in workers_available(min_vram_mb=8000, allow_cpu=True)} == {big.pk, cpu.pk}
    assert {w.pk for w in workers_available(min_vram_mb=8000, allow_cpu=False)} == {big.pk}
    assert workers_available(min_vram_mb=100_000, allow_cpu=False) == []
