"""The worker protocol (v1) over HTTP: one method per call, errors as exceptions, and a backoff helper.

Every error the server sends has the shape ``{"error": code, "detail": text}``; :class:`ProtocolError`
carries both. Failures split into what the agent should retry (:class:`NetworkError`, 5xx
:class:`ServerError`, 429 :class:`Throttled`) and what it should not: 401/403 are :class:`AuthError`
(token revoked or unknown, worker suspended) and stop the agent; other 4xx are plain ``ProtocolError``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
from collections.abc import Callable
from pathlib import Path

import httpx

from workers import __version__

API = "/api/v1"
USER_AGENT = f"agora-worker/{__version__}"
_CHUNK = 1 << 20


class ClientError(Exception):
    """Base of everything the client raises."""

    retryable = False


class NetworkError(ClientError):
    """The server could not be reached or the connection broke (DNS, refused, timeout, reset)."""

    retryable = True


class ProtocolError(ClientError):
    """The server answered with an error status; ``error`` and ``detail`` come from its JSON body."""

    def __init__(self, status: int, error: str, detail: str, retry_after: float | None = None):
        self.status = status
        self.error = error
        self.detail = detail
        self.retry_after = retry_after
        super().__init__(f"HTTP {status} {error}: {detail}" if detail else f"HTTP {status} {error}")


class ServerError(ProtocolError):
    """5xx: the server is in trouble; try again later."""

    retryable = True


class Throttled(ProtocolError):
    """429: too many requests; the server may say how long to wait (``retry_after``)."""

    retryable = True


class AuthError(ProtocolError):
    """401/403: the worker token is not (or no longer) accepted, or the worker is suspended."""

    def explain(self) -> str:
        if self.error == "worker_suspended":
            return f"this worker is suspended by the server's administrators ({self.detail})"
        if self.status == 401:
            return (f"the server no longer accepts this worker's token: it was revoked or is unknown "
                    f"({self.detail}). Enroll the machine again with `agora-worker enroll`")
        return f"the server refused this worker: {self.detail or self.error}"


class DownloadError(ClientError):
    """A downloaded file does not have the sha256 it was asked for."""


def _error_from(response: httpx.Response) -> ProtocolError:
    status = response.status_code
    error, detail = f"http_{status}", response.reason_phrase or ""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = str(body.get("error") or error)
        detail = str(body.get("detail") or detail)
    retry_after = None
    if response.headers.get("Retry-After", "").strip().isdigit():
        retry_after = float(response.headers["Retry-After"])
    if status in (401, 403):
        return AuthError(status, error, detail)
    if status == 429:
        return Throttled(status, error, detail, retry_after)
    if status >= 500:
        return ServerError(status, error, detail, retry_after)
    return ProtocolError(status, error, detail)


class Backoff:
    """Exponential backoff with full jitter: the n-th delay (from 0) is uniform in
    ``[0, min(cap, base · 2ⁿ)]`` (the "full jitter" of AWS's architecture blog), so a fleet of agents that
    lost the server at the same moment does not come back in lockstep. ``reset()`` after a success."""

    def __init__(self, base: float = 1.0, cap: float = 300.0, rng: random.Random | None = None):
        if base <= 0 or cap < base:
            raise ValueError("backoff needs 0 < base <= cap")
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def ceiling(self) -> float:
        return min(self.cap, self.base * 2.0 ** min(self.attempt, 62))

    def next_delay(self) -> float:
        delay = self._rng.uniform(0.0, self.ceiling())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


class Client:
    """One worker's view of the server. Thread-safe for our use: the heartbeat thread gets its own."""

    def __init__(self, server: str, token: str | None = None, *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None):
        self.server = server.rstrip("/")
        self.token = token
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.server, headers=headers, transport=transport,
                                  timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def clone(self) -> Client:
        return Client(self.server, self.token, timeout=self._http.timeout.read or 30.0)

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise NetworkError(f"cannot reach {self.server}: {exc.__class__.__name__}: {exc}") from exc
        if response.status_code >= 400:
            raise _error_from(response)
        return response

    @staticmethod
    def _json(response: httpx.Response) -> dict:
        try:
            body = response.json()
        except ValueError as exc:
            raise ProtocolError(response.status_code, "bad_response", "the server's answer is not JSON") from exc
        if not isinstance(body, dict):
            raise ProtocolError(response.status_code, "bad_response", "the server's answer is not a JSON object")
        return body

    # --- the calls ---------------------------------------------------------------------------------

    def enroll(self, *, enrollment_token: str, name: str, hardware: dict, benchmark: dict,
               agent_version: str = __version__) -> dict:
        body = {"enrollment_token": enrollment_token, "name": name, "hardware": hardware,
                "benchmark": benchmark, "agent_version": agent_version}
        return self._json(self._request("POST", f"{API}/workers/enroll", json=body))

    def heartbeat(self, *, state: str, task_id: int | None = None, progress: float | None = None) -> dict:
        body = {"state": state, "task_id": task_id, "progress": progress}
        return self._json(self._request("POST", f"{API}/workers/heartbeat", json=body))

    def claim(self) -> dict | None:
        response = self._request("POST", f"{API}/tasks/claim")
        if response.status_code == 204:
            return None
        return self._json(response)

    def me(self) -> dict:
        return self._json(self._request("GET", f"{API}/workers/me"))

    def submit_result(self, task_id: int, *, update: bytes, metrics: dict) -> dict:
        files = {"update": ("update.safetensors", update, "application/octet-stream")}
        data = {"metrics": json.dumps(metrics, allow_nan=False)}
        response = self._request("POST", f"{API}/tasks/{int(task_id)}/result", files=files, data=data)
        return self._json(response) if response.content else {}

    def report_failure(self, task_id: int, *, reason: str) -> dict:
        response = self._request("POST", f"{API}/tasks/{int(task_id)}/fail", json={"reason": reason[:1000]})
        return self._json(response) if response.content else {}

    def checkpoint_path(self, sha256: str, url: str | None = None) -> str:
        """The path to fetch a checkpoint from: the task's ``checkpoint_url`` when it points at this server
        (the worker token is never sent elsewhere), else the protocol's ``/api/v1/checkpoints/<sha256>``."""
        if url:
            if url.startswith("/") and not url.startswith("//"):
                return url
            if url.startswith(self.server + "/"):
                return url[len(self.server):]
        return f"{API}/checkpoints/{sha256}"

    def download_checkpoint(self, sha256: str, dest: Path, *, url: str | None = None,
                            on_bytes: Callable[[int, int | None], None] | None = None) -> Path:
        """Stream the checkpoint into ``dest`` (via a temporary file, renamed only once its sha256 matches)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.part"
        digest = hashlib.sha256()
        try:
            with self._http.stream("GET", self.checkpoint_path(sha256, url)) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error_from(response)
                total = int(response.headers["Content-Length"]) if response.headers.get(
                    "Content-Length", "").isdigit() else None
                done = 0
                with open(tmp, "wb") as fh:
                    for chunk in response.iter_bytes(_CHUNK):
                        digest.update(chunk)
                        fh.write(chunk)
                        done += len(chunk)
                        if on_bytes is not None:
                            on_bytes(done, total)
            if digest.hexdigest() != sha256.lower():
                raise DownloadError(f"checkpoint {sha256} arrived with sha256 {digest.hexdigest()}; discarded")
            os.replace(tmp, dest)
        except httpx.TransportError as exc:
            raise NetworkError(f"checkpoint download from {self.server} failed: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return dest
