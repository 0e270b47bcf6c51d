"""What the early-close check and delegation cost a vote, against a plain vote in the same run.

    python -m bench.governance_votes [--members 2000] [--delegators 200] [--repeat 30] [--quick]

Runs on a throwaway test database of whatever DATABASE_URL says (SQLite by default). Each row is the median
time of ``vote_cast`` changing a vote back and forth on an open proposal with ``--members`` eligible members
(verified e-mail), none of whose votes settle it:

- baseline: AGORA_EARLY_CLOSE off, nobody delegates to the voter;
- early close on (counts the eligible weight not yet cast after every vote);
- early close on, and ``--delegators`` members delegate to the voter (their votes follow the delegate's);
- setting a delegation while the delegate has voted on 20 open proposals (carried to each of them).
"""

from __future__ import annotations

import argparse
import itertools

from bench.common import median_time, print_table
from bench.django_env import throwaway_database


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--members", type=int, default=2000)
    ap.add_argument("--delegators", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="200 members, 20 delegators, 5 repeats")
    args = ap.parse_args(argv)
    if args.quick:
        args.members, args.delegators, args.repeat = 200, 20, 5
    with throwaway_database() as connection:
        from allauth.account.models import EmailAddress
        from django.contrib.auth import get_user_model
        from django.test import override_settings

        from governance import services
        from governance.models import Delegation

        User = get_user_model()
        with override_settings(AGORA_VOTER_ELIGIBILITY="verified_email", AGORA_QUORUM_MIN=3):
            User.objects.bulk_create([User(username=f"m{i}", email=f"m{i}@example.org", password="!")
                                      for i in range(args.members)])
            members = list(User.objects.order_by("id"))
            EmailAddress.objects.bulk_create([EmailAddress(user=u, email=u.email, verified=True, primary=True)
                                              for u in members])
            author, voter, *rest = members
            proposal = services.proposal_submit(author=author, kind="training", title="Bench", spec={}, open_now=True)
            choices = itertools.cycle(["yes", "no"])

            def vote():
                services.vote_cast(proposal=proposal, voter=voter, choice=next(choices))

            rows = []
            with override_settings(AGORA_EARLY_CLOSE=False):
                base = median_time(vote, repeat=args.repeat, warmup=2)
            rows.append(("plain vote (baseline)", 0, f"{base * 1000:.2f}", "1.0x"))
            early = median_time(vote, repeat=args.repeat, warmup=2)
            rows.append(("with the early-close check", 0, f"{early * 1000:.2f}", f"{early / base:.1f}x"))
            Delegation.objects.bulk_create([Delegation(delegator=u, delegate=voter) for u in rest[:args.delegators]])
            delegated = median_time(vote, repeat=args.repeat, warmup=2)
            rows.append(("early close + delegators follow", args.delegators, f"{delegated * 1000:.2f}",
                         f"{delegated / base:.1f}x"))
            proposals = [services.proposal_submit(author=author, kind="training", title=f"Open {i}", spec={},
                                                  open_now=True) for i in range(20)]
            for p in proposals:
                services.vote_cast(proposal=p, voter=voter, choice="yes")
            newcomer = rest[args.delegators]
            toggle = itertools.cycle([True, False])

            def delegate():
                if next(toggle):
                    services.delegation_set(delegator=newcomer, delegate=voter)
                else:
                    services.delegation_revoke(delegator=newcomer)

            setting = median_time(delegate, repeat=args.repeat, warmup=2)
            rows.append(("set or revoke a delegation (20 open votes)", 1, f"{setting * 1000:.2f}",
                         f"{setting / base:.1f}x"))
        print(f"database: {connection.vendor}; {args.members} eligible members; median of {args.repeat}")
        print_table(["operation", "delegators", "median ms", "vs plain vote"], rows,
                    title="vote_cast with early close and delegation")


if __name__ == "__main__":
    main()
