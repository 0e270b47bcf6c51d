import json

from django.core.management.base import BaseCommand

from ledger.selectors import iter_chain, ledger_head


class Command(BaseCommand):
    help = "Write the whole ledger as JSON, for `python -m ledger.verify` or anyone's own checker."

    def add_arguments(self, parser):
        parser.add_argument("--output", "-o", default="-", help="file to write (default: standard output)")

    def handle(self, *args, output, **options):
        data = {"head": ledger_head(), "entries": list(iter_chain())}
        text = json.dumps(data, indent=1, ensure_ascii=False)
        if output == "-":
            self.stdout.write(text)
        else:
            with open(output, "w", encoding="utf-8") as fh:
                fh.write(text)
            self.stderr.write(f"wrote {len(data['entries'])} entries to {output}")
