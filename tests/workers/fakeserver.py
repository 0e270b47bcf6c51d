"""A small stand-in for the server side of the worker protocol: an ``http.server`` thread that records every
request and answers from canned, per-route handlers. Lets the agent be tested without Django.

Like the real server it tells the time: a ``Date`` header on every answer, and ``server_time`` (ISO 8601 UTC
with milliseconds), ``stop_task`` and ``stop_reason`` in heartbeat answers. ``clock_offset_s`` sets how far the
server's clock is from this machine's (to test an agent whose clock is wrong); ``stop_task(id, reason)``
makes heartbeats about that task say ``stop_task: true``; ``answers(...)`` plays a sequence of answers (flaky
failures, then success)."""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import json
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DROP = object()  # answer by closing the connection without a response (a network error for the client)
HEARTBEAT = "/api/v1/workers/heartbeat"


def answers(*sequence, then):
    """A route answer that gives each of ``sequence`` once, in order, then ``then`` for ever."""
    queue = list(sequence)
    lock = threading.Lock()

    def answer(_req):
        with lock:
            return queue.pop(0) if queue else then

    return answer


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict
    body: bytes
    json: object = None
    form: dict = field(default_factory=dict)  # multipart: name -> bytes
    at: float = field(default_factory=time.monotonic)


def _parse_multipart(content_type: str, body: bytes) -> dict:
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    out = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        out[name] = part.get_payload(decode=True)
    return out


class FakeServer:
    def __init__(self):
        self.requests: list[Recorded] = []
        self.routes: dict[tuple[str, str], object] = {}
        self.lock = threading.Lock()
        self.clock_offset_s = 0.0
        self.send_server_time = True
        self.stopped: dict[int, str] = {}
        self.on("POST", HEARTBEAT, {"poll_after_s": 0, "worker_state": "online"})
        self.on("POST", "/api/v1/tasks/claim", (204, None))
        self.on("POST", "/api/v1/workers/enroll", (201, {"worker_id": 7, "worker_token": "wkr_secret"}))
        self.on("GET", "/api/v1/workers/me", {"id": 7, "name": "box", "live_state": "online", "status": "active",
                                              "reliability": 0.5, "credits": "3.0000", "tasks_valid": 2,
                                              "tasks_invalid": 0, "last_seen": None})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    # --- configuration ---------------------------------------------------------------------------

    def on(self, method: str, path: str, answer) -> None:
        """``answer``: a dict (200 JSON), ``(status, dict|bytes|None)``, ``DROP``, or a callable taking the
        ``Recorded`` request and returning one of those."""
        with self.lock:
            self.routes[(method, path)] = answer

    def stop_task(self, task_id: int, reason: str) -> None:
        """From now on, heartbeats about ``task_id`` are answered ``stop_task: true`` with ``reason``."""
        with self.lock:
            self.stopped[task_id] = reason

    def now(self) -> float:
        """The server's clock (POSIX seconds)."""
        return time.time() + self.clock_offset_s

    def iso_now(self) -> str:
        return datetime.fromtimestamp(self.now(), UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def start(self) -> FakeServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # --- inspection ------------------------------------------------------------------------------

    def calls(self, method: str | None = None, path: str | None = None) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if (method is None or r.method == method)
                    and (path is None or r.path == path)]

    def heartbeats(self) -> list[dict]:
        return [r.json for r in self.calls("POST", "/api/v1/workers/heartbeat")]

    def claims(self) -> list[Recorded]:
        return self.calls("POST", "/api/v1/tasks/claim")

    def wait_for(self, predicate, timeout: float = 20.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; requests: "
                             f"{[(r.method, r.path, r.json) for r in self.requests][-20:]}")

    # --- the handler -----------------------------------------------------------------------------

    def _answer_for(self, rec: Recorded):
        with self.lock:
            answer = self.routes.get((rec.method, rec.path))
        if answer is None:
            return 404, {"error": "not_found", "detail": f"no route {rec.method} {rec.path}"}
        if callable(answer):
            answer = answer(rec)
        if answer is DROP:
            return DROP
        if isinstance(answer, dict):
            answer = (200, answer)
        if rec.path == HEARTBEAT and answer[0] == 200 and isinstance(answer[1], dict):
            body = dict(answer[1])
            task_id = rec.json.get("task_id") if isinstance(rec.json, dict) else None
            with self.lock:
                reason = self.stopped.get(task_id)
            body.setdefault("stop_task", reason is not None)
            body.setdefault("stop_reason", reason or "")
            if self.send_server_time:
                body.setdefault("server_time", self.iso_now())
            answer = (200, body, *answer[2:])
        return answer

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def date_time_string(self, timestamp=None):  # the Date header, on the server's clock
                return email.utils.formatdate(server.now() if timestamp is None else timestamp, usegmt=True)

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                rec = Recorded(self.command, self.path, dict(self.headers.items()), body)
                ctype = self.headers.get("Content-Type", "")
                if ctype.startswith("application/json") and body:
                    rec.json = json.loads(body)
                elif ctype.startswith("multipart/form-data"):
                    rec.form = _parse_multipart(ctype, body)
                with server.lock:
                    server.requests.append(rec)
                answer = server._answer_for(rec)
                if answer is DROP:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                status, payload = answer[0], answer[1]
                headers = answer[2] if len(answer) == 3 else {}
                if payload is None:
                    data, ctype = b"", None
                elif isinstance(payload, bytes | bytearray):
                    data, ctype = bytes(payload), "application/octet-stream"
                else:
                    data, ctype = json.dumps(payload).encode(), "application/json"
                self.send_response(status)
                if ctype:
                    self.send_header("Content-Type", ctype)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _handle

        return Handler
