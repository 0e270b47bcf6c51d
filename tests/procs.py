"""Start and stop real processes in tests: Celery workers and beat, agents, management commands."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
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
        # This tree's code, not the one an editable install of the environment points at (a benchmark run
        # from a clone of the repository, beside a working tree that is being edited).
        PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    if server_url:
        env["AGORA_PUBLIC_URL"] = server_url
    env.update(extra)
    return env


class Proc:
    """A child process whose output goes to a log file we can read when a test fails."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, cwd: Path = ROOT,
                 new_session: bool = False):
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "ab")  # a restarted process appends to the same log
        # ``new_session``: the process leads its own process group, so ``kill_group`` reaches its children
        # (gunicorn's and Celery's pool workers) and nothing else.
        self.popen = subprocess.Popen(args, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=new_session)
        self.new_session = new_session

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """kill -9 the process (and, for a session leader, everything in its process group)."""
        if self.new_session:
            self.kill_group()
        elif self.alive():
            self.popen.kill()
        self.popen.wait(10)

    def kill_group(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(10)

    def stop(self, sig_timeout: float = 10.0) -> int:
        if self.new_session and self.alive():
            try:
                os.killpg(self.popen.pid, signal.SIGCONT)  # a stopped child cannot act on SIGTERM
            except ProcessLookupError:
                pass
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(sig_timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        if self.new_session:  # pool children that outlived their parent
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
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


def celery_worker(env: dict[str, str], log_path: Path, beat: bool = False, pool: str = "solo",
                  prefix: list[str] | None = None) -> Proc:
    """A Celery worker with one execution slot. ``pool="prefork"`` runs the tasks in a pool child (the
    production default); ``prefix`` runs the worker under another program (see ``tests/e2e/faultpoint.py``)."""
    program = [*prefix, "celery"] if prefix else [str(BIN / "celery")]
    args = [*program, "-A", "agora", "worker", "--loglevel=INFO", "--concurrency=1", f"--pool={pool}",
            "--without-gossip", "--without-mingle"]
    if beat:
        args += ["--beat", f"--schedule={log_path.with_suffix('.beat')}"]
    return Proc(args, env, log_path, new_session=bool(prefix) or pool != "solo")


def celery_beat(env: dict[str, str], log_path: Path) -> Proc:
    return Proc([str(BIN / "celery"), "-A", "agora", "beat", "--loglevel=INFO",
                 f"--schedule={log_path.with_suffix('.schedule')}"], env, log_path)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gunicorn(env: dict[str, str], log_path: Path, port: int, *, workers: int = 1, threads: int = 8,
             prefix: list[str] | None = None) -> Proc:
    """gunicorn serving Agora on 127.0.0.1:``port``, in its own process group (``kill`` takes the master
    and its workers down together, as a crashed container does). Access log lines go to the log."""
    program = [*prefix, "gunicorn"] if prefix else [str(BIN / "gunicorn")]
    args = [*program, "agora.wsgi", "-b", f"127.0.0.1:{port}", "-k", "gthread", "-w", str(workers),
            "--threads", str(threads), "--timeout", "120", "--graceful-timeout", "5", "--no-control-socket",
            "--access-logfile", "-", "--access-logformat", 'ACCESS %(m)s %(U)s %(s)s']
    return Proc(args, env, log_path, new_session=True)


def http_ok(url: str, timeout: float = 2.0) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except OSError:
        return False


class CpuThrottle(threading.Thread):
    """A CPU ``share`` times as fast as this one, as ``cpulimit`` makes it: ``pid`` may use at most ``share``
    CPU-seconds per second of wall time (all its threads together, read from ``/proc/<pid>/stat``); whenever
    it is ahead of that budget it is held stopped (SIGSTOP) until the wall clock catches up (SIGCONT)."""

    def __init__(self, pid: int, share: float, tick_s: float = 0.02):
        super().__init__(name=f"cpu-throttle-{pid}", daemon=True)
        self.pid, self.share, self.tick_s = pid, share, tick_s
        self.done = threading.Event()
        self._hz = os.sysconf("SC_CLK_TCK")

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self._hz  # utime + stime

    def run(self) -> None:
        stopped = False
        try:
            base, started = self.cpu_seconds(), time.monotonic()
            while not self.done.is_set():
                ahead = self.cpu_seconds() - base > self.share * (time.monotonic() - started)
                if ahead != stopped:
                    os.kill(self.pid, signal.SIGSTOP if ahead else signal.SIGCONT)
                    stopped = ahead
                self.done.wait(self.tick_s)
        except (ProcessLookupError, FileNotFoundError):
            return
        finally:
            try:
                os.kill(self.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        self.done.set()
        self.join(5)


def enroll_agent(env, tmp_path: Path, name: str, server: str) -> tuple[dict, Path]:
    """Enroll a real ``agora-worker`` named ``name`` with ``server`` (its own config and cache folder under
    ``tmp_path``); returns the agent's environment and config path."""
    from marketplace.services import enrollment_token_create
    from tests.factories import UserFactory

    secret = enrollment_token_create(owner=UserFactory(), name=name)
    # One directory per agent: the agent keeps its pause flag and task state next to its config file.
    config = tmp_path / name / "worker.json"
    agent_env = {**env, "AGORA_WORKER_CONFIG": str(config), "AGORA_WORKER_CACHE": str(tmp_path / name / "cache")}
    done = subprocess.run([str(BIN / "agora-worker"), "enroll", "--server", server, "--token", secret.token,
                           "--name", name], env=agent_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return agent_env, config
