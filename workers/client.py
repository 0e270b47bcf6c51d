"""The worker protocol (v1) over HTTP: one method per call, errors as exceptions, and a backoff helper.

Every error the server sends has the shape ``{"error": code, "detail": text}``; :class:`ProtocolError`
carries both. Failures split into what the agent should retry (:class:`NetworkError`, 5xx
:class:`ServerError`, 429 :class:`Throttled`) and what it should not: 401/403 are :class:`AuthError`
(token revoked or unknown, worker suspended) and stop the agent; other 4xx are plain ``ProtocolError``, and
on the task calls (result, fail) 404/409/410 and 403 ``not_your_task`` are :class:`TaskGone`: the server no
longer wants anything for that task.

Every reply also tells the time: :class:`ServerClock` learns the server's clock from the standard ``Date``
header of every answer and from the heartbeat's ``server_time`` (ISO 8601 UTC with milliseconds), so the
agent reasons about deadlines in server time whatever its own wall clock says.

The link can be capped (``max_mbps``, ``agora-worker run --max-mbps``): a :class:`TokenBucket` per direction,
shared by every connection of the agent, paces uploads as they are sent and downloads as they are read.
:class:`LinkStats` counts the bytes of request and response bodies in each direction.
"""

from __future__ import annotations

import email.utils
import hashlib
import io
import json
import math
import os
import random
import secrets
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
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


class TaskGone(ProtocolError):
    """The server no longer wants a result or report for this task (expired, re-issued, already has one,
    unknown, or now someone else's): retrying cannot help, and there is nothing left to deliver."""


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


def _steady() -> float:
    """A clock that only moves forward and, on Linux, keeps counting while the machine sleeps (so an offset
    learnt before a suspend still holds after it)."""
    if hasattr(time, "CLOCK_BOOTTIME"):
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    return time.monotonic()


def parse_timestamp(value) -> float | None:
    """An ISO 8601 time (``Z`` or an offset; naive means UTC) as POSIX seconds, or None."""
    if not value or not isinstance(value, str) or len(value) > 64:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


class ServerClock:
    """The server's time, as this machine's steady clock plus an offset learnt from the server's replies.

    The local wall clock is used only until the first reply (shifted by ``assume_wall_offset``, the offset
    the previous run of the agent saw), so a skewed, stepped or faked wall clock does not move deadlines.
    Each reading brackets the server's time at the moment the reply arrived: between the stamp and the stamp
    plus its resolution (1 s for ``Date``, 1 ms for ``server_time``) plus the round trip. A reading replaces
    the current estimate when it is tighter, or when the estimate falls outside its bracket (the local
    machine slept, or the server's clock was stepped), so coarse ``Date`` headers never blur a precise
    ``server_time`` that they agree with. Thread-safe: the heartbeat thread and the loop share one.
    """

    def __init__(self, *, wall: Callable[[], float] = time.time, steady: Callable[[], float] = _steady):
        self._wall = wall
        self._steady = steady
        self._lock = threading.Lock()
        self._offset: float | None = None  # server time - steady clock
        self._width = math.inf
        self._wall_offset = 0.0

    @property
    def synced(self) -> bool:
        with self._lock:
            return self._offset is not None

    def now(self) -> float:
        """The server's time now, in POSIX seconds."""
        with self._lock:
            if self._offset is None:
                return self._wall() + self._wall_offset
            return self._steady() + self._offset

    def steady(self) -> float:
        return self._steady()

    def wall_offset(self) -> float:
        """Server time minus this machine's wall clock (kept across restarts: see ``assume_wall_offset``)."""
        return self.now() - self._wall()

    def assume_wall_offset(self, offset: float) -> None:
        """Until the first reply, take server time as the wall clock plus ``offset``."""
        if isinstance(offset, int | float) and math.isfinite(offset):
            with self._lock:
                self._wall_offset = float(offset)

    def observe(self, stamp: float, *, uncertainty: float, received_at: float | None = None) -> None:
        """The server's clock read ``stamp`` at most ``uncertainty`` seconds before ``received_at`` (steady)."""
        if not math.isfinite(stamp) or not math.isfinite(uncertainty) or uncertainty < 0:
            return
        received = self._steady() if received_at is None else received_at
        with self._lock:
            if self._offset is not None:
                estimate = received + self._offset
                if stamp <= estimate <= stamp + uncertainty and uncertainty >= self._width:
                    return
            self._offset = stamp + uncertainty / 2 - received
            self._width = uncertainty

    def observe_date_header(self, value: str | None, *, rtt: float, received_at: float | None = None) -> None:
        if not value:
            return
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return
        if parsed is None or parsed.tzinfo is None:
            return
        self.observe(parsed.timestamp(), uncertainty=1.0 + max(rtt, 0.0), received_at=received_at)

    def observe_server_time(self, value, *, rtt: float, received_at: float | None = None) -> None:
        stamp = parse_timestamp(value)
        if stamp is not None:
            self.observe(stamp, uncertainty=0.001 + max(rtt, 0.0), received_at=received_at)


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


class TokenBucket:
    """A token bucket of ``rate`` bytes per second holding at most ``burst`` bytes: ``consume(n)`` returns
    once ``n`` bytes may pass, sleeping for what the bucket lacks (a chunk larger than the burst simply
    waits longer). Thread-safe; one bucket per direction of the link, shared by every connection."""

    def __init__(self, rate: float, burst: float | None = None, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError("the rate must be a positive number of bytes per second")
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(self.rate / 20.0, 16 * 1024.0)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = self.burst
        self._last = clock()

    @classmethod
    def from_mbps(cls, mbps: float) -> TokenBucket:
        return cls(mbps * 1e6 / 8.0)

    def consume(self, n: int) -> float:
        """Take ``n`` bytes' worth of tokens, waiting as long as needed; returns the seconds waited."""
        if n <= 0:
            return 0.0
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n  # a debt: whoever comes next waits for it too
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait


class LinkStats:
    """Bytes sent and received (request and response bodies), counted as they pass. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.sent = 0
        self.received = 0

    def add(self, *, sent: int = 0, received: int = 0) -> None:
        with self._lock:
            self.sent += max(int(sent), 0)
            self.received += max(int(received), 0)

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.sent, self.received


class _PacedUpload(io.BytesIO):
    """An upload body read through the link's upload bucket, so a multipart upload leaves at the link's pace."""

    def __init__(self, data: bytes, bucket: TokenBucket | None, stats: LinkStats | None):
        super().__init__(data)
        self._bucket = bucket
        self._stats = stats

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(_CHUNK if size is None or size < 0 else min(size, _CHUNK))
        if chunk and self._bucket is not None:
            self._bucket.consume(len(chunk))
        return chunk


class Client:
    """One worker's view of the server. Thread-safe for our use: the heartbeat thread gets its own.

    ``max_mbps`` caps the link in each direction (a token bucket per direction, shared with clones);
    ``stats`` counts the bytes that pass (shared with clones too)."""

    def __init__(self, server: str, token: str | None = None, *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None, clock: ServerClock | None = None,
                 max_mbps: float | None = None, stats: LinkStats | None = None,
                 buckets: tuple[TokenBucket, TokenBucket] | None = None):
        self.server = server.rstrip("/")
        self.token = token
        self.clock = clock or ServerClock()
        self.max_mbps = max_mbps
        if buckets is None and max_mbps:
            buckets = (TokenBucket.from_mbps(max_mbps), TokenBucket.from_mbps(max_mbps))
        self.upload_bucket, self.download_bucket = buckets or (None, None)
        self.stats = stats or LinkStats()
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
        """Another connection for another thread, sharing this one's server clock."""
        buckets = (self.upload_bucket, self.download_bucket) if self.upload_bucket is not None else None
        return Client(self.server, self.token, timeout=self._http.timeout.read or 30.0, clock=self.clock,
                      stats=self.stats, buckets=buckets)

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        sent = self.clock.steady()
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise NetworkError(f"cannot reach {self.server}: {exc.__class__.__name__}: {exc}") from exc
        body = len(response.content)
        request_length = response.request.headers.get("Content-Length", "")
        self.stats.add(sent=int(request_length) if request_length.isdigit() else 0, received=body)
        if self.download_bucket is not None:
            self.download_bucket.consume(body)
        received = self.clock.steady()
        response.extensions["agora_timing"] = (received - sent, received)
        self.clock.observe_date_header(response.headers.get("Date"), rtt=received - sent, received_at=received)
        if response.status_code >= 400:
            raise _error_from(response)
        return response

    def _task_call(self, method: str, path: str, **kwargs) -> httpx.Response:
        """A call about one task: answers saying the task is no longer wanted become :class:`TaskGone`."""
        try:
            return self._request(method, path, **kwargs)
        except ProtocolError as exc:
            if exc.status in (404, 409, 410) or (exc.status == 403 and exc.error == "not_your_task"):
                raise TaskGone(exc.status, exc.error, exc.detail) from exc
            raise

    @staticmethod
    def _json(response: httpx.Response) -> dict:
        try:
            body = response.json()
        except ValueError as exc:
            raise ProtocolError(response.status_code, "bad_response", "the server's answer is not JSON") from exc
        if not isinstance(body, dict):
            raise ProtocolError(response.status_code, "bad_response", "the server's answer is not a JSON object")
        return body

    @classmethod
    def _lenient_json(cls, response: httpx.Response) -> dict:
        """The body of a 2xx answer whose status is what counts: a proxy's empty or HTML body is not an error."""
        try:
            return cls._json(response) if response.content else {}
        except ProtocolError:
            return {}

    # --- the calls ---------------------------------------------------------------------------------

    def enroll(self, *, enrollment_token: str, name: str, hardware: dict, benchmark: dict,
               agent_version: str = __version__) -> dict:
        body = {"enrollment_token": enrollment_token, "name": name, "hardware": hardware,
                "benchmark": benchmark, "agent_version": agent_version}
        return self._json(self._request("POST", f"{API}/workers/enroll", json=body))

    def heartbeat(self, *, state: str, task_id: int | None = None, progress: float | None = None) -> dict:
        body = {"state": state, "task_id": task_id, "progress": progress}
        response = self._request("POST", f"{API}/workers/heartbeat", json=body)
        answer = self._json(response)
        rtt, received = response.extensions["agora_timing"]
        self.clock.observe_server_time(answer.get("server_time"), rtt=rtt, received_at=received)
        return answer

    def claim(self) -> dict | None:
        response = self._request("POST", f"{API}/tasks/claim")
        if response.status_code == 204:
            return None
        return self._json(response)

    def me(self) -> dict:
        return self._json(self._request("GET", f"{API}/workers/me"))

    def submit_result(self, task_id: int, *, update: bytes, metrics: dict) -> dict:
        files = {"update": ("update.safetensors", _PacedUpload(update, self.upload_bucket, None),
                            "application/octet-stream")}
        data = {"metrics": json.dumps(metrics, allow_nan=False)}
        response = self._task_call("POST", f"{API}/tasks/{int(task_id)}/result", files=files, data=data)
        return self._lenient_json(response)

    def report_failure(self, task_id: int, *, reason: str) -> dict:
        response = self._task_call("POST", f"{API}/tasks/{int(task_id)}/fail", json={"reason": reason[:1000]})
        return self._lenient_json(response)

    def checkpoint_path(self, sha256: str, url: str | None = None) -> str:
        """The path to fetch a checkpoint from: the task's ``checkpoint_url`` when it points at this server
        (the worker token is never sent elsewhere), else the protocol's ``/api/v1/checkpoints/<sha256>``."""
        if url:
            if url.startswith("/") and not url.startswith("//"):
                return url
            if url.startswith(self.server + "/"):
                return url[len(self.server):]
        return f"{API}/checkpoints/{sha256}"

    def download_delta(self, sha256: str, *, max_bytes: int, url: str | None = None) -> bytes:
        """The published delta that rebuilds checkpoint ``sha256`` from its predecessor (``GET
        /api/v1/checkpoints/<sha256>/delta``, or the task's ``delta_url`` on this server), at most
        ``max_bytes``. The caller checks the rebuilt checkpoint's sha256; a 404 is a :class:`ProtocolError`."""
        path = self.checkpoint_path(sha256, url) if url else f"{API}/checkpoints/{sha256}/delta"
        chunks, total = [], 0
        try:
            with self._http.stream("GET", path) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error_from(response)
                for chunk in response.iter_bytes(_CHUNK):
                    self.stats.add(received=len(chunk))
                    if self.download_bucket is not None:
                        self.download_bucket.consume(len(chunk))
                    total += len(chunk)
                    if total > max_bytes:
                        raise DownloadError(f"the delta to {sha256} is larger than {max_bytes} bytes; not used")
                    chunks.append(chunk)
        except httpx.TransportError as exc:
            raise NetworkError(f"delta download from {self.server} failed: {exc}") from exc
        return b"".join(chunks)

    def data_path(self, kind: str, sha256: str, url: str | None = None) -> str:
        """Where a prepared run's ``tokenizers`` or ``shards`` blob is: the task's URL when it points at this
        server (the worker token is never sent elsewhere), else ``/api/v1/<kind>/<sha256>``."""
        if kind not in ("tokenizers", "shards"):
            raise ValueError(f"unknown data kind {kind!r}")
        if url and ((url.startswith("/") and not url.startswith("//")) or url.startswith(self.server + "/")):
            return url[len(self.server):] if url.startswith(self.server) else url
        return f"{API}/{kind}/{sha256}"

    def download_data(self, kind: str, sha256: str, dest: Path, *, url: str | None = None,
                      max_bytes: int | None = None) -> Path:
        """Stream a tokenizer or token shard into ``dest`` (via a temporary file, renamed only once its sha256
        matches; at most ``max_bytes``)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.part"
        digest, total = hashlib.sha256(), 0
        try:
            with self._http.stream("GET", self.data_path(kind, sha256, url)) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error_from(response)
                with open(tmp, "wb") as fh:
                    for chunk in response.iter_bytes(_CHUNK):
                        self.stats.add(received=len(chunk))
                        if self.download_bucket is not None:
                            self.download_bucket.consume(len(chunk))
                        total += len(chunk)
                        if max_bytes is not None and total > max_bytes:
                            raise DownloadError(f"{kind[:-1]} {sha256} is larger than {max_bytes} bytes; not used")
                        digest.update(chunk)
                        fh.write(chunk)
            if digest.hexdigest() != sha256.lower():
                raise DownloadError(f"{kind[:-1]} {sha256} arrived with sha256 {digest.hexdigest()}; discarded")
            os.replace(tmp, dest)
        except httpx.TransportError as exc:
            raise NetworkError(f"{kind[:-1]} download from {self.server} failed: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return dest

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
                        self.stats.add(received=len(chunk))
                        if self.download_bucket is not None:
                            self.download_bucket.consume(len(chunk))
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
