"""Ledger appends per second with concurrent writers, chain verified afterwards.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/test python -m bench.ledger_append

Baselines measured in the same run: one writer, and plain inserts of the same rows with no chain
and no head lock (what the database alone can do).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from bench.django_env import throwaway_database


def _run_writers(writers: int, per_writer: int, work) -> float:
    from django.db import connections

    barrier = threading.Barrier(writers + 1)
    errors: list[BaseException] = []

    def body(n: int):
        try:
            barrier.wait()
            for i in range(per_writer):
                work(n, i)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=body, args=(n,)) for n in range(writers)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return writers * per_writer / elapsed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--per-writer", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    with throwaway_database() as connection:
        from django.utils import timezone

        from ledger.models import Entry
        from ledger.selectors import ledger_verify
        from ledger.services import entry_append

        payload = {"proposal_id": 12, "choice": "yes", "weight": "1", "note": "benchmark"}
        plain_seq = iter(range(10**9, 2 * 10**9))
        lock = threading.Lock()

        def chained(n, i):
            entry_append(actor=f"writer{n}", action="bench.append", subject=f"bench:{n}", payload=payload)

        def plain(n, i):
            with lock:
                seq = next(plain_seq)
            Entry.objects.create(seq=seq, created_at=timezone.now(), actor=f"writer{n}", action="bench.plain",
                                 subject="", payload=payload, prev_hash="", hash=f"{seq:064d}")

        rows = []
        for label, writers, work in (
            (f"plain insert, {args.writers} writers (baseline)", args.writers, plain),
            ("ledger append, 1 writer", 1, chained),
            (f"ledger append, {args.writers} writers", args.writers, chained),
        ):
            per = args.per_writer if writers > 1 else args.per_writer * 2
            rates = [_run_writers(writers, per, work) for _ in range(args.repeats)]
            rows.append((label, statistics.median(rates)))
        Entry.objects.filter(action="bench.plain").delete()
        started = time.perf_counter()
        verdict = ledger_verify()
        verify_s = time.perf_counter() - started

        base = rows[0][1]
        print(f"\nLedger appends on {connection.vendor} (median of {args.repeats} runs)\n")
        print(f"{'case':<44} {'appends/s':>10} {'vs baseline':>12}")
        for label, rate in rows:
            print(f"{label:<44} {rate:>10.0f} {rate / base:>11.2f}x")
        print(f"\nchain verified afterwards: {verdict} ({verify_s:.2f} s)")
        if not verdict.ok:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
