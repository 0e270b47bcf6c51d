"""The agent's loop: heartbeat, claim, run, report; pause, finish and abort; resume after a restart.

States (sent in every heartbeat): ``idle`` (waiting for work), ``busy`` (running ``task_id``, with
``progress`` = step/steps), ``paused`` (the volunteer paused the agent; nothing is claimed).

- The loop heartbeats, then (unless paused, or busy machine with ``idle_only``) claims; 204 means no work,
  so it waits ``poll_after_s`` (the server's answer) and tries again.
- While a task runs, a background thread keeps heartbeating ``busy`` every ``poll_after_s``.
- Pause: the pause file ``<config dir>/paused`` exists (``agora-worker pause``/``resume``; SIGUSR1 creates
  or removes it). Paused between tasks: heartbeats say ``paused``, nothing is claimed. Paused during a task:
  training halts between two steps and heartbeats say ``paused`` with the task id until it is resumed.
- Finish: ``--finish``, or the first SIGTERM/SIGINT: the task in progress is completed and reported, then
  the agent exits (right away when idle). A second SIGINT/SIGTERM aborts the task and reports ``fail``.
  Stopping while paused in the middle of a task also abandons it (it could not finish without resuming).
- Errors: network errors, 5xx and 429 are retried with exponential backoff and full jitter (capped);
  401/403 stop the agent with a message (token revoked or unknown, worker suspended).
- Restart: the task in progress is written to ``<config dir>/state.json``. On start, a task left there whose
  deadline has not passed is reported as failed with reason "agent restarted", so the server can re-issue
  it at once instead of waiting for the deadline (re-running it would need the same data and optimizer
  state, and the server may already have handed it to someone else); a task past its deadline is dropped.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from workers import config as cfgmod
from workers.client import AuthError, Backoff, Client, ClientError, ProtocolError
from workers.runner import TaskAborted

log = logging.getLogger("agora.worker")

EXIT_OK = 0
EXIT_AUTH = 3


@dataclass
class AgentOptions:
    once: bool = False
    finish: bool = False
    idle_only: bool = False
    min_poll_s: float = 1.0
    max_poll_s: float = 300.0
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 120.0
    pause_check_s: float = 0.5
    report_attempts: int = 8


def parse_deadline(value) -> datetime | None:
    if not value or not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class _Heartbeater(threading.Thread):
    """Heartbeats the agent's current state every ``poll_after_s`` while a task runs."""

    def __init__(self, agent: Agent, client: Client):
        super().__init__(name="agora-heartbeat", daemon=True)
        self.agent = agent
        self.client = client
        self.done = threading.Event()

    def run(self) -> None:
        try:
            while not self.done.is_set():
                try:
                    self.agent.heartbeat(self.client)
                except AuthError as exc:
                    self.agent.auth_failed(exc)
                    return
                except ClientError as exc:
                    log.warning("heartbeat failed (%s); training continues", exc)
                self.done.wait(self.agent.poll_s)
        finally:
            self.client.close()

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=30)


class Agent:
    def __init__(self, config: cfgmod.WorkerConfig, *, runner, client: Client | None = None,
                 options: AgentOptions | None = None, idle_check: Callable[[], str | None] | None = None,
                 backoff: Backoff | None = None):
        self.config = config
        self.runner = runner
        self.client = client or Client(config.server, config.worker_token)
        self.options = options or AgentOptions()
        self.idle_check = idle_check
        self.backoff = backoff or Backoff(self.options.backoff_base_s, self.options.backoff_cap_s)
        self.poll_s = max(self.options.min_poll_s, 1.0)
        self.stop_message = ""
        self.tasks_done = 0
        self._lock = threading.Lock()
        self._state = ("idle", None, None)  # state, task_id, progress
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._auth_error: AuthError | None = None
        self._last_pause_check = 0.0
        self._paused_cached = False
        self._announced: str | None = None

    # --- state --------------------------------------------------------------------------------

    @property
    def config_path(self):
        return self.config.path

    def paused(self) -> bool:
        return cfgmod.is_paused(self.config_path)

    def snapshot(self) -> tuple[str, int | None, float | None]:
        with self._lock:
            return self._state

    def _set_state(self, state: str, task_id: int | None = None, progress: float | None = None) -> None:
        with self._lock:
            self._state = (state, task_id, progress)

    def heartbeat(self, client: Client | None = None) -> dict:
        state, task_id, progress = self.snapshot()
        answer = (client or self.client).heartbeat(state=state, task_id=task_id,
                                                   progress=None if progress is None else round(progress, 4))
        try:
            poll = float(answer.get("poll_after_s", self.poll_s))
        except (TypeError, ValueError):
            poll = self.poll_s
        self.poll_s = min(max(poll, self.options.min_poll_s), self.options.max_poll_s)
        return answer

    # --- control (signals, tests) -------------------------------------------------------------

    def request_stop(self) -> None:
        """Finish the task in progress, then stop (the first SIGTERM/SIGINT)."""
        if self._stop.is_set():
            self.request_abort()
            return
        self._stop.set()
        state, task_id, _ = self.snapshot()
        if task_id is not None:
            log.warning("stopping after task %s is finished and reported; interrupt again to abort it", task_id)
        else:
            log.info("stopping")
        self._wake.set()

    def request_abort(self) -> None:
        """Abort the task in progress (reported as failed), then stop (the second SIGINT)."""
        self._stop.set()
        self._abort.set()
        log.warning("aborting")
        self._wake.set()

    def toggle_pause(self) -> None:
        was = cfgmod.set_paused(self.config_path, not self.paused())
        log.info("%s by signal", "resumed" if was else "paused")
        self._last_pause_check = 0.0
        self._wake.set()

    def auth_failed(self, exc: AuthError) -> None:
        self._auth_error = exc
        self.stop_message = exc.explain()
        self._stop.set()
        self._abort.set()
        self._wake.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
        signal.signal(signal.SIGINT, lambda *_: self.request_stop())
        if hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, lambda *_: self.toggle_pause())

    def _wait(self, seconds: float) -> None:
        """Sleep, but wake at once on a signal (stop, abort, pause toggled)."""
        self._wake.wait(max(0.0, seconds))
        self._wake.clear()

    def _announce(self, message: str, level: int = logging.INFO) -> None:
        if message != self._announced:
            log.log(level, message)
            self._announced = message

    # --- the loop -----------------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped; returns the process exit code (``stop_message`` says why it stopped)."""
        log.info("worker %s (%s) on %s", self.config.worker_id, self.config.name or "unnamed", self.config.server)
        try:
            self._recover()
            while not self._stop.is_set():
                if not self._cycle():
                    break
        except AuthError as exc:
            self.auth_failed(exc)
        finally:
            self.client.close()
        if self._auth_error is not None:
            log.error("stopping: %s", self.stop_message)
            return EXIT_AUTH
        self.stop_message = self.stop_message or "stopped"
        return EXIT_OK

    def _retry_later(self, exc: ClientError, what: str) -> None:
        delay = self.backoff.next_delay()
        if isinstance(exc, ProtocolError) and exc.retry_after:
            delay = max(delay, min(exc.retry_after, self.backoff.cap))
        log.warning("%s failed: %s; retrying in %.1f s", what, exc, delay)
        self._wait(delay)

    def _cycle(self) -> bool:
        """One turn of the loop; returns False when the agent should stop."""
        paused = self.paused()
        self._set_state("paused" if paused else "idle")
        try:
            self.heartbeat()
        except AuthError:
            raise
        except ClientError as exc:
            self._retry_later(exc, "heartbeat")
            return True
        self.backoff.reset()
        if paused:
            self._announce("paused: heartbeating, not claiming work (agora-worker resume to continue)")
            self._wait(self.poll_s)
            return True
        if self.options.idle_only and self.idle_check is not None:
            reason = self.idle_check()
            if reason:
                self._announce(f"machine not idle ({reason}); not claiming work")
                self._wait(self.poll_s)
                return True
        if self._stop.is_set():
            return False
        try:
            task = self.client.claim()
        except AuthError:
            raise
        except ClientError as exc:
            self._retry_later(exc, "claim")
            return True
        self.backoff.reset()
        if task is None:
            self._announce(f"idle: no work right now; polling every {self.poll_s:g} s")
            if self.options.once:
                return False
            self._wait(self.poll_s)
            return True
        self._announced = None
        self._run_task(task)
        if self.options.once or self.options.finish:
            return False
        return self._auth_error is None

    # --- one task -----------------------------------------------------------------------------

    def check(self) -> None:
        """Between training steps: abort if asked; halt here while paused."""
        if self._abort.is_set():
            raise TaskAborted(self._abort_reason())
        now = time.monotonic()
        if now - self._last_pause_check < self.options.pause_check_s:
            return
        self._last_pause_check = now
        if not self.paused():
            return
        state, task_id, progress = self.snapshot()
        self._set_state("paused", task_id, progress)
        log.info("paused during task %s; training halts until resumed", task_id)
        while self.paused():
            if self._abort.is_set():
                raise TaskAborted(self._abort_reason())
            if self._stop.is_set():
                raise TaskAborted("agent stopped while paused")
            self._wait(self.options.pause_check_s)
        log.info("resumed task %s", task_id)
        self._set_state("busy", task_id, progress)

    def _abort_reason(self) -> str:
        if self._auth_error is not None:
            return "worker token refused"
        return "aborted by the volunteer"

    def on_step(self, step: int, steps: int, loss: float) -> None:
        state, task_id, _ = self.snapshot()
        self._set_state(state, task_id, step / steps if steps else None)
        self.check()

    def _run_task(self, task: dict) -> None:
        task_id = int(task["id"])
        self._set_state("busy", task_id, 0.0)
        log.info("claimed task %s (run %s, round %s, shard %s/%s)", task_id, task.get("run_id"), task.get("round"),
                 (task.get("dataset") or {}).get("shard_index"), (task.get("dataset") or {}).get("shard_count"))
        cfgmod.state_save(self.config_path, {"task_id": task_id, "run_id": task.get("run_id"),
                                             "round": task.get("round"), "deadline": task.get("deadline"),
                                             "started_at": datetime.now(UTC).isoformat()})
        beat = _Heartbeater(self, self.client.clone())
        beat.start()
        try:
            try:
                output = self.runner.run(task, self)
            except TaskAborted as exc:
                log.warning("task %s aborted: %s", task_id, exc)
                aborted = str(exc)
                if self._auth_error is None:
                    self._deliver(task, "fail", lambda: self.client.report_failure(task_id, reason=aborted))
                return
            except Exception as exc:
                log.exception("task %s failed", task_id)
                reason = f"{exc.__class__.__name__}: {exc}"
                self._deliver(task, "fail", lambda: self.client.report_failure(task_id, reason=reason))
                return
            log.info("task %s trained: loss %.4f -> %.4f in %.1f s; uploading %d bytes", task_id,
                     output.metrics["loss_start"], output.metrics["loss_end"], output.metrics["seconds"],
                     len(output.update))
            if self._deliver(task, "result",
                             lambda: self.client.submit_result(task_id, update=output.update, metrics=output.metrics)):
                self.tasks_done += 1
                log.info("task %s: result delivered", task_id)
        finally:
            beat.stop()
            cfgmod.state_clear(self.config_path)
            self._set_state("idle")

    def _deliver(self, task: dict, what: str, call: Callable[[], object]) -> bool:
        """Send a result or failure, retrying network/5xx errors with backoff until the task's deadline
        (at most ``report_attempts`` tries). 401/403 stop the agent; other 4xx are logged and dropped."""
        deadline = parse_deadline(task.get("deadline"))
        backoff = Backoff(self.backoff.base, self.backoff.cap)
        for attempt in range(1, self.options.report_attempts + 1):
            try:
                call()
                return True
            except AuthError as exc:
                self.auth_failed(exc)
                return False
            except ClientError as exc:
                if not exc.retryable:
                    log.error("task %s: the server refused the %s: %s", task["id"], what, exc)
                    return False
                late = deadline is not None and datetime.now(UTC) >= deadline
                if attempt == self.options.report_attempts or late or self._abort.is_set():
                    log.error("task %s: giving up on sending the %s: %s", task["id"], what, exc)
                    return False
                delay = backoff.next_delay()
                log.warning("task %s: sending the %s failed (%s); retrying in %.1f s", task["id"], what, exc, delay)
                self._wait(delay)
        return False

    def _recover(self) -> None:
        """Report a task that a previous run of the agent left unfinished (see the module docstring)."""
        state = cfgmod.state_load(self.config_path)
        task_id = state.get("task_id")
        if not task_id:
            return
        deadline = parse_deadline(state.get("deadline"))
        if deadline is not None and datetime.now(UTC) >= deadline:
            log.info("task %s was interrupted by a restart and its deadline has passed; the server re-issues it",
                     task_id)
        else:
            log.warning("task %s was interrupted by a restart; reporting it as failed", task_id)
            task = {"id": task_id, "deadline": state.get("deadline")}
            self._deliver(task, "fail", lambda: self.client.report_failure(int(task_id), reason="agent restarted"))
            if self._auth_error is not None:
                raise self._auth_error
        cfgmod.state_clear(self.config_path)

