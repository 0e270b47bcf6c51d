"""Start local CPU agents for the demo: enroll each once (through a real enrollment token and the real
`agora-worker enroll`), then run `agora-worker run --allow-cpu` until stopped."""

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from marketplace.services import enrollment_token_create


def _agent_command() -> list[str]:
    script = shutil.which("agora-worker", path=str(Path(sys.executable).parent)) or shutil.which("agora-worker")
    return [script] if script else [sys.executable, "-m", "workers.cli"]


class Command(BaseCommand):
    help = "Run local demo agents (CPU) against this server."

    def add_arguments(self, parser):
        parser.add_argument("--agents", type=int, default=2)
        parser.add_argument("--owner", default="alice")
        parser.add_argument("--server", default=settings.AGORA_PUBLIC_URL)

    def handle(self, *args, agents, owner, server, **options):
        user = get_user_model().objects.filter(username=owner).first()
        if user is None:
            raise CommandError(f"no user {owner!r}: run `manage.py seed_demo` first")
        self._wait_for(server)
        base = settings.VAR_DIR / "agents"
        procs = []
        for n in range(1, agents + 1):
            home = base / f"agent-{n}"
            config = home / "worker.json"
            env = {**os.environ, "AGORA_WORKER_CACHE": str(home / "cache"), "AGORA_WORKER_CONFIG": str(config)}
            if not config.exists():
                token = enrollment_token_create(owner=user, name=f"demo-cpu-{n}").token
                subprocess.run([*_agent_command(), "enroll", "--server", server, "--token", token,
                                "--name", f"demo-cpu-{n}", "--config", str(config)], env=env, check=True)
            procs.append(subprocess.Popen([*_agent_command(), "run", "--allow-cpu", "--config", str(config)],
                                          env=env))

        def stop(signum, frame):
            for proc in procs:
                proc.send_signal(signal.SIGINT)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        for proc in procs:
            proc.wait()

    def _wait_for(self, server: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{server}/healthz", timeout=2).read()
                return
            except OSError:
                time.sleep(1)
        raise CommandError(f"the server at {server} did not answer within {timeout:.0f} s")
