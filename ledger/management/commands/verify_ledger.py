from django.core.management.base import BaseCommand, CommandError

from ledger.chain import PublishedHead
from ledger.selectors import ledger_verify


class Command(BaseCommand):
    help = ("Recompute every link of the ledger's hash chain and report every broken entry by seq "
            "(edited contents, broken links, seq gaps, rows missing from the end).")

    def add_arguments(self, parser):
        parser.add_argument("--head", metavar="SEQ:HASH",
                            help="a head published earlier (GET /api/v1/ledger/head): the chain must still "
                                 "contain that entry with that hash")

    def handle(self, *args, head=None, **options):
        published = None
        if head:
            try:
                published = PublishedHead.parse(head)
            except ValueError as exc:
                raise CommandError(f"--head: {exc}") from None
        verdict = ledger_verify(published=published)
        if not verdict.ok:
            raise CommandError(str(verdict))
        self.stdout.write(self.style.SUCCESS(str(verdict)))
