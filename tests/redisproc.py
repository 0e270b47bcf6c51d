"""A Redis server of the test's own, on a spare port, that a test may kill -9 and start again.

Fault drills must never touch the machine's Redis (other programs share it). ``RedisProc`` runs
``redis-server --port <free> --save '' --appendonly no`` (nothing persisted, so a restart comes back empty,
as a crashed cache does) and keeps the port across restarts, so clients configured with its URL
reconnect by themselves once it is back::

    def test_something(redis_proc, settings):
        settings.CACHES = redis_proc.caches()   # point the Django cache at it
        redis_proc.kill()                       # kill -9 (or .pause(): SIGSTOP, a hung server)
        ...
        redis_proc.start()                      # same port, empty

The ``redis_proc`` fixture skips the test when ``redis-server`` is not installed (unless the run requires
services, as CI does) and always stops the server afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisProc:
    def __init__(self, port: int | None = None, *, binary: str = "redis-server"):
        self.binary = shutil.which(binary) or binary
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"agora-redis-{self.port}-"))
        self.popen: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def caches(self, *, key_prefix: str = "test", timeout_s: float = 0.5) -> dict:
        """A ``CACHES`` setting for Django's Redis cache on this server, with the short socket timeouts
        production uses, so a dead server costs milliseconds."""
        return {"default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": self.url,
            "KEY_PREFIX": key_prefix,
            "OPTIONS": {"socket_connect_timeout": timeout_s, "socket_timeout": timeout_s},
        }}

    def start(self, timeout: float = 10.0) -> RedisProc:
        if self.alive():
            return self
        self._log = open(self.dir / "redis.log", "ab")
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.dir), "--daemonize", "no"]
        deadline = time.monotonic() + timeout
        while True:
            self.popen = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
            if self._wait_ready(deadline):
                return self
            # Right after a kill -9 the port can still be held for a moment; try again until the deadline.
            self.popen.kill()
            self.popen.wait(5)
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}: {self.output()}")
            time.sleep(0.1)

    def _wait_ready(self, deadline: float) -> bool:
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                return False
            if self.ping():
                return True
            time.sleep(0.05)
        return False

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """kill -9: no shutdown, no goodbye to clients (their connections just break)."""
        if self.alive():
            os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)

    def pause(self) -> None:
        """SIGSTOP: the server still accepts connections (the kernel does) but never answers, like a hung
        or partitioned Redis. Clients then wait for their socket timeout."""
        if self.alive():
            os.kill(self.popen.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.alive():
            os.kill(self.popen.pid, signal.SIGCONT)

    def restart(self) -> RedisProc:
        self.kill()
        return self.start()

    def stop(self) -> None:
        if self.alive():
            self.resume()
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None

    def output(self) -> str:
        path = self.dir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def redis_server_available() -> bool:
    return shutil.which("redis-server") is not None


@pytest.fixture
def redis_proc():
    """A running ``RedisProc`` of this test's own, stopped and removed afterwards."""
    if not redis_server_available():
        if os.environ.get("AGORA_REQUIRE_SERVICES") == "1":
            pytest.fail("redis-server is required")
        pytest.skip("needs redis-server")
    proc = RedisProc().start()
    try:
        yield proc
    finally:
        proc.cleanup()
