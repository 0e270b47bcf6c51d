"""Proposal list page and API with 1,000 proposals and 100,000 votes, against a trivial view.

    python -m bench.proposal_list [--repeat 30]

Runs on a throwaway test database of whatever DATABASE_URL says (SQLite by default). Measures, for
10 and then 1,000 proposals (120 votes on each one that is open or decided), the query count and the median render time of the
first page, a filtered page and the API list, logged in (so "my vote" is computed too). Baseline
in the same run: ``GET /ping``. The query count must not grow with the number of rows.
"""

from __future__ import annotations

import argparse
import random
from datetime import timedelta
from decimal import Decimal

from bench.common import median_time, print_table
from bench.django_env import throwaway_database

VOTERS = 120  # 120 votes on each of the 5/6 proposals that are not drafts: 100,000 votes at 1,000
URLS = [
    ("/ping (baseline)", "/ping"),
    ("list page, first page", "/proposals/"),
    ("list page, kind+status filter", "/proposals/?kind=training&status=active"),
    ("list page, search", "/proposals/?q=round"),
    ("API list (limit 20)", "/api/v1/proposals/"),
]


def populate(*, start: int, stop: int, author, voters) -> None:
    from django.utils import timezone

    from governance.models import Proposal, Vote
    from governance.specs import content_hash, spec_normalise

    rng = random.Random(start)
    spec = spec_normalise(kind="training", spec={})
    guard = spec_normalise(kind="guardrail", spec={"kind": "data_filter", "patterns": ["x"]})
    now = timezone.now()
    statuses = ["active", "active", "succeeded", "defeated", "enacted", "draft"]
    proposals = []
    for i in range(start, stop):
        kind = "training" if i % 3 else "guardrail"
        status = statuses[i % len(statuses)]
        opened = status != "draft"
        body_spec = spec if kind == "training" else guard
        proposals.append(Proposal(
            kind=kind, status=status, title=f"Proposal {i}: {'another round' if i % 2 else 'a guardrail'}",
            body="Some *markdown* text. " * 20, author=author, spec=body_spec, content_hash=content_hash(body_spec),
            created_at=now - timedelta(minutes=i), opens_at=now - timedelta(days=1) if opened else None,
            closes_at=now + timedelta(days=2) if opened else None, quorum=Decimal(3) if opened else None,
            threshold=Decimal("0.5") if opened else None,
        ))
    created = Proposal.objects.bulk_create(proposals, batch_size=1000)
    votes = [
        Vote(proposal=p, voter=v, choice=rng.choice(["yes", "yes", "no", "abstain"]), weight=Decimal(1),
             created_at=now, updated_at=now)
        for p in created if p.status != "draft"
        for v in voters
    ]
    Vote.objects.bulk_create(votes, batch_size=5000)


def measure(client, repeat: int, label: str, count: int) -> list[tuple]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    rows = []
    baseline = None
    for name, url in URLS:
        with CaptureQueriesContext(connection) as ctx:
            assert client.get(url).status_code == 200, url
        queries = len(ctx)  # read now: the next request clears the connection's query log
        seconds = median_time(lambda u=url: client.get(u), repeat=repeat, warmup=2)
        baseline = baseline or seconds
        rows.append((name, count, queries, f"{seconds * 1000:.2f}", f"{seconds / baseline:.1f}x"))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--proposals", type=int, default=1000)
    args = ap.parse_args(argv)
    with throwaway_database() as connection:
        from django.contrib.auth import get_user_model
        from django.test import Client

        from governance.models import Vote

        User = get_user_model()
        User.objects.bulk_create([User(username=f"voter{i}", password="!") for i in range(VOTERS)])
        voters = list(User.objects.filter(username__startswith="voter"))
        author = User.objects.create_user("author")
        client = Client()
        client.force_login(voters[0])

        populate(start=0, stop=10, author=author, voters=voters)
        small = measure(client, args.repeat, "small", 10)
        populate(start=10, stop=args.proposals, author=author, voters=voters)
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("ANALYZE")
        large = measure(client, args.repeat, "large", args.proposals)
        print(f"database: {connection.vendor}; {args.proposals} proposals, {Vote.objects.count():,} votes; "
              f"median of {args.repeat} requests (Django test client, logged in)")
        print_table(["request", "proposals", "queries", "median ms", "vs /ping"], small + large,
                    title="proposal list: 10 vs 1,000 proposals")
        grew = [s[0] for s, big in zip(small, large, strict=True) if big[2] != s[2]]
        print("query count constant in rows:", "yes" if not grew else f"NO ({', '.join(grew)})")


if __name__ == "__main__":
    main()
