"""Build the volunteer's agent wheel that "Add a worker" offers (also built on first request when missing)."""

from django.core.management.base import BaseCommand, CommandError

from marketplace import agent_package


class Command(BaseCommand):
    help = "Build agora_worker-<version>-py3-none-any.whl into AGORA_VAR_DIR/agent/ (served at /agent/<file>)."

    def add_arguments(self, parser):
        parser.add_argument("--out", help="Folder to write the wheel to (default: AGORA_VAR_DIR/agent/).")

    def handle(self, *args, out=None, **options):
        try:
            wheel = agent_package.build_wheel(out)
        except agent_package.AgentPackageError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"{wheel.path}\nsha256 {wheel.sha256}")
