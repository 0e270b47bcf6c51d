from django.core.management.base import BaseCommand, CommandError

from ledger.selectors import ledger_verify


class Command(BaseCommand):
    help = "Recompute every link of the ledger's hash chain and report the first broken seq."

    def handle(self, *args, **options):
        verdict = ledger_verify()
        if not verdict.ok:
            raise CommandError(str(verdict))
        self.stdout.write(self.style.SUCCESS(str(verdict)))
