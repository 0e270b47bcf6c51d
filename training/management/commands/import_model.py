"""``manage.py import_model DIR --slug SLUG``: a Hugging Face model directory as a community model's next version."""

from django.core.management.base import BaseCommand, CommandError

from training import services
from training.errors import ModelImportError


class Command(BaseCommand):
    help = ("Import a Hugging Face causal LM directory (config.json of a llama or gpt2 model, model.safetensors, "
            "tokenizer.json) as the next version of a community model (version 1 of a new one).")

    def add_arguments(self, parser):
        parser.add_argument("directory")
        parser.add_argument("--slug", help="The community model (default: the directory's name).")
        parser.add_argument("--name", default="", help="Display name of a new model.")

    def handle(self, *args, directory, slug=None, name="", **options):
        from pathlib import Path

        path = Path(directory).resolve()
        try:
            version = services.model_import(directory=path, slug=slug or path.name.lower(), name=name)
        except ModelImportError as exc:
            raise CommandError(f"{exc.field}: {exc}") from None
        self.stdout.write(self.style.SUCCESS(
            f"imported {version.model.slug} v{version.number}: {version.arch}, checkpoint {version.checkpoint_id}, "
            f"tokenizer {version.tokenizer_sha256 or 'bytes'}"))
