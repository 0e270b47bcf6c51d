"""Concurrent writers on PostgreSQL: the head lock keeps the chain linear."""

import threading

import pytest
from django.db import connection, connections

from ledger.models import Entry
from ledger.selectors import ledger_verify
from ledger.services import entry_append

WRITERS = 8
PER_WRITER = 15


@pytest.mark.django_db(transaction=True)
def test_eight_concurrent_writers_keep_the_chain_linear():
    if connection.vendor != "postgresql":
        pytest.skip("row locking is exercised on PostgreSQL (SQLite serialises writers by itself)")
    errors: list[BaseException] = []
    barrier = threading.Barrier(WRITERS)

    def writer(n):
        try:
            barrier.wait()
            for i in range(PER_WRITER):
                entry_append(actor=f"writer{n}", action="test.concurrent", payload={"n": n, "i": i})
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert Entry.objects.count() == WRITERS * PER_WRITER
    assert list(Entry.objects.values_list("seq", flat=True)) == list(range(1, WRITERS * PER_WRITER + 1))
    verdict = ledger_verify()
    assert verdict.ok, str(verdict)
