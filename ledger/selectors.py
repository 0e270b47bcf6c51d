from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

from django.db.models import QuerySet

from ledger.chain import GENESIS, Problem, PublishedHead, Verdict, verify
from ledger.models import Entry, Head


def entries_list(*, after: int = 0, action: str = "", subject: str = "") -> QuerySet[Entry]:
    qs = Entry.objects.filter(seq__gt=after)
    if action:
        qs = qs.filter(action__startswith=action)
    if subject:
        qs = qs.filter(subject=subject)
    return qs.order_by("seq")


def entries_for_subjects(*, subjects: list[str], limit: int = 100) -> list[Entry]:
    return list(Entry.objects.filter(subject__in=subjects).order_by("-seq")[:limit])


def ledger_head() -> dict:
    """The published head: the last entry's seq and hash (seq 0 and the genesis hash when empty)."""
    head = Head.objects.filter(id=1).first()
    return {"seq": head.seq if head else 0, "hash": head.hash if head else GENESIS}


def iter_chain(*, chunk_size: int = 2000) -> Iterator[dict]:
    for entry in Entry.objects.order_by("seq").iterator(chunk_size=chunk_size):
        yield entry.as_chain_dict()


def ledger_verify(*, published: PublishedHead | None = None) -> Verdict:
    """Every broken entry of the stored chain, checked against the head row (which every append moves in
    the same transaction, so rows deleted from the end show) and against ``published``, a head someone
    kept from ``GET /api/v1/ledger/head`` earlier (so a rewritten history shows)."""
    # The head is read before the entries, so appends committed meanwhile only add entries beyond it.
    before = PublishedHead.from_mapping(ledger_head())
    heads = [before] + ([published] if published is not None else [])
    verdict = verify(iter_chain(), heads=heads)
    after = ledger_head()
    if verdict.last_seq > after["seq"]:
        problem = Problem(after["seq"] + 1, "head", f"entries beyond the head (seq {after['seq']}) that no append "
                                                    "recorded: inserted by hand?")
        verdict = replace(verdict, problems=(*verdict.problems, problem))
    return verdict
