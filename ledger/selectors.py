from __future__ import annotations

from collections.abc import Iterator

from django.db.models import QuerySet

from ledger.chain import GENESIS, Verdict, verify
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
    head = Head.objects.filter(id=1).first()
    return {"seq": head.seq if head else 0, "hash": head.hash if head else GENESIS}


def iter_chain(*, chunk_size: int = 2000) -> Iterator[dict]:
    for entry in Entry.objects.order_by("seq").iterator(chunk_size=chunk_size):
        yield entry.as_chain_dict()


def ledger_verify() -> Verdict:
    verdict = verify(iter_chain())
    if verdict.ok:
        head = ledger_head()
        if head["seq"] != verdict.count or head["hash"] != verdict.head_hash:
            return Verdict(False, verdict.count, verdict.head_hash, head["seq"],
                           "the head does not match the last entry (entries removed?)")
    return verdict
