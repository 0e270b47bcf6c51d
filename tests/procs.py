"""Start and stop real processes in tests: Celery workers and beat, agents, management commands."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from django.conf import settings

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def database_url() -> str:
    """A DATABASE_URL for the test database pytest-django created (its name differs from the configured one)."""
    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    user = db.get("USER") or "postgres"
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    host = db.get("HOST") or "127.0.0.1"
    port = db.get("PORT") or 5432
    return f"postgres://{user}{password}@{host}:{port}/{db['NAME']}"


def child_env(server_url: str = "", **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url(),
        DJANGO_SETTINGS_MODULE="agora.settings",
        DJANGO_SECRET_KEY=settings.SECRET_KEY,
        AGORA_VAR_DIR=str(settings.VAR_DIR),
        AGORA_MEDIA_ROOT=str(settings.MEDIA_ROOT),
        AGORA_CACHE_PREFIX=settings.CACHES["default"].get("KEY_PREFIX", ""),
        PYTHONUNBUFFERED="1",
    )
    if server_url:
        env["AGORA_PUBLIC_URL"] = server_url
    env.update(extra)
    return env


class Proc:
    """A child process whose output goes to a log file we can read when a test fails."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, cwd: Path = ROOT):
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(args, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig_timeout: float = 10.0) -> int:
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(sig_timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.25, what: str = "condition",
             procs: list[Proc] | None = None):
    """Poll until ``predicate()`` is truthy; on timeout fail with the children's output attached."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    logs = "\n".join(f"--- {p.args}\n{p.output()[-4000:]}" for p in procs or [])
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{logs}")


def celery_worker(env: dict[str, str], log_path: Path, beat: bool = False) -> Proc:
    args = [str(BIN / "celery"), "-A", "agora", "worker", "--loglevel=INFO", "--concurrency=1", "--pool=solo",
            "--without-gossip", "--without-mingle"]
    if beat:
        args += ["--beat", f"--schedule={log_path.with_suffix('.beat')}"]
    return Proc(args, env, log_path)
