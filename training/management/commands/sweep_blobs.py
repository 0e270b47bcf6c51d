"""``manage.py sweep_blobs``: remove the temporary files of blob writes that died (local storage)."""

from django.core.management.base import BaseCommand

from training import blobs


class Command(BaseCommand):
    help = "Remove temporary files left in checkpoint storage by blob writes that were killed."

    def add_arguments(self, parser):
        parser.add_argument("--older-than", type=float, default=blobs.STALE_TEMP_S, metavar="SECONDS",
                            help=f"only files not modified for this long (default {blobs.STALE_TEMP_S})")

    def handle(self, *args, older_than: float, **options):
        removed = blobs.blob_sweep_temp(older_than_s=max(0.0, older_than))
        for path in removed:
            self.stdout.write(path)
        self.stdout.write(f"removed {len(removed)} temporary file{'' if len(removed) == 1 else 's'}")
