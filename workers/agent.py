"""The agent's loop: heartbeat, claim, run, deliver; pause, finish and abort; resume after a restart.

States (sent in every heartbeat): ``idle`` (waiting for work), ``busy`` (running or delivering ``task_id``,
with ``progress`` = step/steps), ``paused`` (the volunteer paused the agent; nothing is claimed).

- One agent per config folder: ``run`` takes an exclusive lock on ``<config dir>/agent.lock`` first and exits
  at once with ``EXIT_LOCKED`` when another live agent holds it. The kernel drops the lock when its holder
  dies, so whatever an agent finds in the folder after taking the lock was left by a dead agent.
- The loop heartbeats, then (unless paused, or busy machine with ``idle_only``) claims; 204 means no work,
  so it waits ``poll_after_s`` (the server's answer) and tries again. After delivering a result it asks
  sooner (``follow_up_first_s``, 0.25 s, doubling up to ``poll_after_s``; the heartbeat at most once a
  second meanwhile): the run's next round usually opens seconds after its last result, and a full interval
  (30 s by default) would leave the volunteer idle every round.
- While a task runs or its result is being delivered, a background thread keeps heartbeating ``busy`` every
  ``poll_after_s``. A heartbeat answer with ``stop_task: true`` (and ``stop_reason``) for that task stops it
  between two steps: nothing is uploaded or reported, the reason is logged, and the agent claims again. The
  same happens when the task's deadline passes.
- Time: deadlines are compared with the server's clock (:class:`workers.client.ServerClock`, learnt from every
  reply), never with this machine's wall clock, which may be wrong.
- Pause: the pause file ``<config dir>/paused`` exists (``agora-worker pause``/``resume``; SIGUSR1 creates
  or removes it). Paused between tasks: heartbeats say ``paused``, nothing is claimed. Paused during a task:
  training halts between two steps and heartbeats say ``paused`` with the task id until it is resumed.
- Finish: ``--finish``, or the first SIGTERM/SIGINT: the task in progress is completed and delivered, then
  the agent exits (right away when idle). A second SIGINT/SIGTERM aborts the task and reports ``fail``; if
  the task had finished and its result is still waiting to be delivered, the result stays on disk instead.
  Stopping while paused in the middle of a task also abandons it (it could not finish without resuming).
- Results: a finished result is written to disk first (``result.json`` + ``result.safetensors`` beside
  ``state.json``), then delivered; network errors, 5xx and 429 are retried with capped, jittered backoff
  until the task's deadline (server time), across restarts. An answer saying the server no longer wants it
  (404/409/410, or the task is now someone else's) discards it, as does a ``stop_task`` heartbeat.
- Errors: network errors, 5xx and 429 are retried with exponential backoff and full jitter (capped);
  401/403 stop the agent with a message (token revoked or unknown, worker suspended).
- Restart: a pending result is delivered (see above). Otherwise a task left in ``<config dir>/state.json``
  was interrupted mid-training by the death of the previous agent (the lock proves it is gone); if its
  deadline has not passed it is reported as failed with reason "agent restarted", so the server can re-issue
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
from datetime import datetime, timezone

from workers import config as cfgmod
from workers.client import AuthError, Backoff, Client, ClientError, ProtocolError, TaskGone, parse_timestamp
from workers.runner import TaskAborted

log = logging.getLogger("agora.worker")

EXIT_OK = 0
EXIT_AUTH = 3
EXIT_LOCKED = 4


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
    # After a delivered result, the first re-claim comes this soon, the next ones twice as late each time.
    follow_up_first_s: float = 0.25
    # Tries for a failure report (and for a result whose task has no deadline); results retry until the deadline.
    report_attempts: int = 8


def parse_deadline(value) -> datetime | None:
    stamp = parse_timestamp(value)
    return None if stamp is None else datetime.fromtimestamp(stamp, timezone.utc)


class TaskNotWanted(TaskAborted):
    """The server no longer wants the task (a ``stop_task`` heartbeat, or its deadline passed in server time):
    stop, upload nothing, report nothing."""


@dataclass
class _CurrentTask:
    task_id: int
    deadline: float | None  # server time, POSIX seconds
    stop_reason: str | None = None


class _Heartbeater(threading.Thread):
    """Heartbeats the agent's current state every ``poll_after_s`` while a task runs or is delivered."""

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
                    log.warning("heartbeat failed (%s); the task goes on", exc)
                self.done.wait(self.agent.poll_s)
        finally:
            self.client.close()

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=30)


class Agent:
    def __init__(self, config: cfgmod.WorkerConfig, *, runner, client: Client | None = None,
                 options: AgentOptions | None = None, idle_check: Callable[[], str | None] | None = None,
                 backoff: Backoff | None = None, lock: cfgmod.AgentLock | None = None):
        self.config = config
        self.runner = runner
        self.client = client or Client(config.server, config.worker_token)
        self.clock = self.client.clock
        self.options = options or AgentOptions()
        self.idle_check = idle_check
        self.backoff = backoff or Backoff(self.options.backoff_base_s, self.options.backoff_cap_s)
        self.lock = lock
        self.poll_s = max(self.options.min_poll_s, 1.0)
        self.stop_message = ""
        self.tasks_done = 0
        self._lock = threading.Lock()
        self._state = ("idle", None, None)  # state, task_id, progress
        self._current: _CurrentTask | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._auth_error: AuthError | None = None
        self._last_pause_check = 0.0
        self._follow_up_s: float | None = None  # the next quick re-claim's delay, after a delivered result
        self._last_heartbeat = (-1e9, None)  # when, and the state it said
        self._paused_cached = False
        self._announced: str | None = None
        # (run_id, round, steady time) of the end of the last task's training: where the next round's wall
        # time starts when it is the same run's next round (see ``_link_metrics``).
        self._last_trained: tuple[object, object, float] | None = None

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
        self._last_heartbeat = (time.monotonic(), state)
        answer = (client or self.client).heartbeat(state=state, task_id=task_id,
                                                   progress=None if progress is None else round(progress, 4))
        try:
            poll = float(answer.get("poll_after_s", self.poll_s))
        except (TypeError, ValueError):
            poll = self.poll_s
        if poll != poll:  # NaN
            poll = self.poll_s
        self.poll_s = min(max(poll, self.options.min_poll_s), self.options.max_poll_s)
        if task_id is not None and answer.get("stop_task") is True:
            self._server_stops(task_id, answer.get("stop_reason"))
        return answer

    def _server_stops(self, task_id: int, reason) -> None:
        reason = str(reason or "no reason given")[:500]
        with self._lock:
            current = self._current
            if current is None or current.task_id != task_id or current.stop_reason is not None:
                return
            current.stop_reason = reason
        log.warning("the server asked to stop task %s: %s", task_id, reason)
        self._wake.set()

    def _unwanted(self, current: _CurrentTask) -> str | None:
        """Why the server no longer wants ``current``, or None while it still does."""
        if current.stop_reason is not None:
            return f"the server asked to stop it ({current.stop_reason})"
        if current.deadline is not None:
            now = self.clock.now()
            if now >= current.deadline:
                return (f"its deadline {_iso(current.deadline)} has passed (server time {_iso(now)}"
                        f"{'' if self.clock.synced else ', estimated: no reply from the server yet'})")
        return None

    # --- control (signals, tests) -------------------------------------------------------------

    def request_stop(self) -> None:
        """Finish the task in progress, then stop (the first SIGTERM/SIGINT)."""
        if self._stop.is_set():
            self.request_abort()
            return
        self._stop.set()
        self._halt_ahead(wait=False)  # a signal handler: no waiting for the chunk in progress
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
        """Sleep, but wake at once on a signal (stop, abort, pause toggled) or a ``stop_task``."""
        self._wake.wait(max(0.0, seconds))
        self._wake.clear()

    def _announce(self, message: str, level: int = logging.INFO) -> None:
        if message != self._announced:
            log.log(level, message)
            self._announced = message

    # --- the loop -----------------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped; returns the process exit code (``stop_message`` says why it stopped)."""
        lock = self.lock or cfgmod.AgentLock(self.config_path)
        owns_lock = not lock.held
        if owns_lock:
            try:
                lock.acquire()
            except cfgmod.AgentLocked as exc:
                self.client.close()
                self.stop_message = str(exc)
                log.error("not starting: %s", exc)
                return EXIT_LOCKED
        log.info("worker %s (%s) on %s", self.config.worker_id, self.config.name or "unnamed", self.config.server)
        try:
            self._recover()
            while not self._stop.is_set():
                if not self._cycle():
                    break
        except AuthError as exc:
            self.auth_failed(exc)
        finally:
            self._halt_ahead()
            close = getattr(self.runner, "close", None)
            if close is not None:  # the state kept between rounds reaches the disk before the agent exits
                close()
            self.client.close()
            if owns_lock:
                lock.release()
        if self._auth_error is not None:
            log.error("stopping: %s", self.stop_message)
            return EXIT_AUTH
        self.stop_message = self.stop_message or "stopped"
        return EXIT_OK

    def _retry_delay(self, backoff: Backoff, exc: ClientError) -> float:
        delay = backoff.next_delay()
        if isinstance(exc, ProtocolError) and exc.retry_after:
            delay = max(delay, min(exc.retry_after, backoff.cap))
        return delay

    def _retry_later(self, exc: ClientError, what: str) -> None:
        delay = self._retry_delay(self.backoff, exc)
        log.warning("%s failed: %s; retrying in %.1f s", what, exc, delay)
        self._wait(delay)

    def _cycle(self) -> bool:
        """One turn of the loop; returns False when the agent should stop."""
        paused = self.paused()
        self._set_state("paused" if paused else "idle")
        when, said = self._last_heartbeat
        quick = self._follow_up_s is not None and said == "idle" and time.monotonic() - when < 1.0
        try:
            if not quick:  # quick re-claims after a result repeat an idle heartbeat at most once a second
                self.heartbeat()
        except AuthError:
            raise
        except ClientError as exc:
            self._retry_later(exc, "heartbeat")
            return True
        self.backoff.reset()
        if paused:
            self._halt_ahead()
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
            if self.options.once:
                return False
            if self._follow_up_s is not None and self._follow_up_s < self.poll_s:
                delay, self._follow_up_s = self._follow_up_s, 2 * self._follow_up_s
                log.debug("no task yet after the last result; asking again in %.2f s", delay)
            else:
                self._follow_up_s = None
                delay = self.poll_s
                self._announce(f"idle: no work right now; polling every {self.poll_s:g} s")
            self._wait(delay)
            return True
        self._announced = None
        self._follow_up_s = None
        self._run_task(task)
        if self.options.once or self.options.finish:
            return False
        return self._auth_error is None

    # --- one task -----------------------------------------------------------------------------

    def check(self) -> None:
        """Between training steps: abort if asked or if the server no longer wants the task; halt here while
        paused."""
        if self._abort.is_set():
            raise TaskAborted(self._abort_reason())
        self._check_wanted()
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
            self._check_wanted()
            if self._stop.is_set():
                raise TaskAborted("agent stopped while paused")
            self._wait(self.options.pause_check_s)
        log.info("resumed task %s", task_id)
        self._set_state("busy", task_id, progress)

    def _check_wanted(self) -> None:
        current = self._current
        if current is not None:
            reason = self._unwanted(current)
            if reason:
                raise TaskNotWanted(reason)

    def _abort_reason(self) -> str:
        if self._auth_error is not None:
            return "worker token refused"
        return "aborted by the volunteer"

    def on_step(self, step: int, steps: int, loss: float) -> None:
        state, task_id, _ = self.snapshot()
        self._set_state(state, task_id, step / steps if steps else None)
        self.check()

    def _halt_ahead(self, wait: bool = True) -> None:
        """Stop training ahead (overlap runs: ``workers.overlap``) when pausing or stopping; what was trained
        stays usable for the next task."""
        ahead = getattr(self.runner, "ahead", None)
        if ahead is not None:
            ahead.halt(wait=wait)

    def _run_task(self, task: dict) -> None:
        # Overlap runs train ahead while a result travels; not with --once/--finish (no next task), nor with
        # --idle-only (training ahead would make the machine look busy to the idle check).
        self.runner.train_ahead = not (self._stop.is_set() or self.options.once or self.options.finish
                                       or self.options.idle_only)
        task_id = int(task["id"])
        current = _CurrentTask(task_id, parse_timestamp(task.get("deadline")))
        self._current = current
        self._set_state("busy", task_id, 0.0)
        log.info("claimed task %s (run %s, round %s, shard %s/%s)", task_id, task.get("run_id"), task.get("round"),
                 (task.get("dataset") or {}).get("shard_index"), (task.get("dataset") or {}).get("shard_count"))
        cfgmod.state_save(self.config_path, {"task_id": task_id, "run_id": task.get("run_id"),
                                             "round": task.get("round"), "deadline": task.get("deadline"),
                                             "started_at": datetime.now(timezone.utc).isoformat(),
                                             "clock_offset_s": round(self.clock.wall_offset(), 3)})
        claimed_at = time.monotonic()
        link_before = self.client.stats.snapshot()
        self.runner.checkpoint_via = None  # set by the runner: cache, delta (published step) or full
        beat = _Heartbeater(self, self.client.clone())
        beat.start()
        try:
            try:
                output = self.runner.run(task, self)
                self._check_wanted()  # a stop_task or the deadline may have come with the last step
            except TaskNotWanted as exc:
                log.warning("task %s stopped: %s; nothing is uploaded, claiming again", task_id, exc)
                return
            except TaskAborted as exc:
                log.warning("task %s aborted: %s", task_id, exc)
                if self._auth_error is None:
                    self._report_failure(current, str(exc))
                return
            except Exception as exc:
                log.exception("task %s failed", task_id)
                self._report_failure(current, f"{exc.__class__.__name__}: {exc}")
                return
            output.metrics.update(self._link_metrics(task, output, claimed_at, link_before))
            log.info("task %s trained: loss %.4f -> %.4f in %.1f s; uploading %d bytes", task_id,
                     output.metrics["loss_start"], output.metrics["loss_end"], output.metrics["seconds"],
                     len(output.update))
            pending = cfgmod.PendingResult(
                task_id=task_id, deadline=task.get("deadline") if isinstance(task.get("deadline"), str) else None,
                metrics=output.metrics, update=output.update, run_id=task.get("run_id"), round=task.get("round"),
                finished_at=datetime.now(timezone.utc).isoformat(), clock_offset_s=round(self.clock.wall_offset(), 3))
            try:
                cfgmod.pending_save(self.config_path, pending)
                cfgmod.state_clear(self.config_path)  # from here on the result on disk speaks for the task
            except OSError as exc:  # a full or read-only disk must not cost the result itself
                log.warning("task %s: cannot keep the result on disk (%s); it is lost if the agent stops before "
                            "it is delivered", task_id, exc)
            self._deliver_result(pending, current)
        finally:
            beat.stop()
            self._current = None
            cfgmod.state_clear(self.config_path)
            self._set_state("idle")

    def _link_metrics(self, task: dict, output, claimed_at: float, link_before: tuple[int, int]) -> dict:
        """Utilisation and traffic of this task's round, sent with its metrics.

        The round's wall time runs from the end of this agent's previous training (when that was the same
        run's previous round, so the upload, the wait for aggregation, the claim and the download all count)
        or else from this claim, to the end of this training; compute time is the training's own seconds
        (with overlap, the steps trained while the previous upload travelled too). Bytes are the link's
        bodies since the claim, plus this update's upload."""
        now = time.monotonic()
        last = self._last_trained
        start = claimed_at
        if last is not None and last[0] == task.get("run_id") and isinstance(task.get("round"), int) \
                and last[1] == task["round"] - 1:
            start = last[2]
        self._last_trained = (task.get("run_id"), task.get("round"), now)
        details = {**(getattr(output, "details", None) or {}), **(getattr(self.runner, "overlap_info", None) or {})}
        self.runner.overlap_info = None
        compute = float(details.get("compute_seconds", output.metrics.get("seconds", 0.0)))
        compute = round(compute, 3)
        wall = round(max(now - start, compute, 0.001), 3)
        sent, received = self.client.stats.snapshot()
        metrics = {"compute_seconds": compute, "wall_seconds": wall,
                   "utilisation": round(min(compute / wall, 1.0), 4),
                   "bytes_sent": sent - link_before[0] + len(output.update),
                   "bytes_received": received - link_before[1]}
        via = getattr(self.runner, "checkpoint_via", None)
        if via in ("cache", "delta", "full"):
            metrics["checkpoint_via"] = via
        base = details.get("base_checkpoint_sha256", task.get("checkpoint_sha256"))
        if isinstance(base, str) and len(base) == 64:
            metrics["base_checkpoint_sha256"] = base
        for key in ("overlap_steps", "overlap_from_round"):
            if isinstance(details.get(key), int):
                metrics[key] = details[key]
        return metrics

    def _deliver_result(self, pending: cfgmod.PendingResult, current: _CurrentTask) -> bool:
        """Upload the pending result until it is delivered, no longer wanted, or its deadline (server time)
        passes; the file on disk goes when one of these happens. A second stop signal (abort) or a refused
        token leave it on disk for the next start."""
        task_id = pending.task_id
        backoff = Backoff(self.backoff.base, self.backoff.cap)
        attempts = 0
        while True:
            reason = self._unwanted(current)
            # Before any reply the server's time is only an estimate: one try lets the server judge.
            if reason and (attempts or self.clock.synced or current.stop_reason is not None):
                log.warning("task %s: discarding its result: %s", task_id, reason)
                cfgmod.pending_clear(self.config_path)
                return False
            attempts += 1
            try:
                self.client.submit_result(task_id, update=pending.update, metrics=pending.metrics)
            except TaskGone as exc:
                log.warning("task %s: the server no longer wants this result (%s); discarding it", task_id, exc)
                cfgmod.pending_clear(self.config_path)
                return False
            except AuthError as exc:
                self.auth_failed(exc)
                log.error("task %s: the result stays in %s", task_id, cfgmod.pending_manifest_path(self.config_path))
                return False
            except ClientError as exc:
                if not exc.retryable:
                    log.error("task %s: the server refused the result: %s; discarding it", task_id, exc)
                    cfgmod.pending_clear(self.config_path)
                    return False
                if self._abort.is_set():
                    log.warning("task %s: delivering the result failed (%s); it stays in %s and is delivered when "
                                "the agent starts again", task_id, exc, cfgmod.pending_manifest_path(self.config_path))
                    return False
                if current.deadline is None and attempts >= self.options.report_attempts:
                    log.error("task %s: giving up on the result after %d attempts (the task has no deadline): %s",
                              task_id, attempts, exc)
                    cfgmod.pending_clear(self.config_path)
                    return False
                delay = self._retry_delay(backoff, exc)
                if current.deadline is not None:
                    left = current.deadline - self.clock.now()
                    delay = min(delay, max(left, 0.0))
                    log.warning("task %s: delivering the result failed (%s); retrying in %.1f s (%.0f s left "
                                "before its deadline, server time)", task_id, exc, delay, max(left, 0.0))
                else:
                    log.warning("task %s: delivering the result failed (%s); retrying in %.1f s", task_id, exc, delay)
                self._wait(delay)
                continue
            cfgmod.pending_clear(self.config_path)
            self.tasks_done += 1
            self._follow_up_s = self.options.follow_up_first_s  # the next round is likely seconds away
            log.info("task %s: result delivered", task_id)
            return True

    def _report_failure(self, current: _CurrentTask, reason: str) -> None:
        """Tell the server the task failed, so it re-issues it now rather than at the deadline. Best effort:
        at most ``report_attempts`` tries, none after the deadline (the server re-issues it then anyway)."""
        backoff = Backoff(self.backoff.base, self.backoff.cap)
        for attempt in range(1, self.options.report_attempts + 1):
            try:
                self.client.report_failure(current.task_id, reason=reason)
                return
            except TaskGone as exc:
                log.info("task %s: the server no longer expects a report (%s)", current.task_id, exc)
                return
            except AuthError as exc:
                self.auth_failed(exc)
                return
            except ClientError as exc:
                if not exc.retryable:
                    log.error("task %s: the server refused the failure report: %s", current.task_id, exc)
                    return
                late = self._unwanted(current)
                if attempt == self.options.report_attempts or late or self._abort.is_set():
                    log.error("task %s: giving up on reporting the failure: %s", current.task_id, exc)
                    return
                delay = self._retry_delay(backoff, exc)
                log.warning("task %s: reporting the failure failed (%s); retrying in %.1f s", current.task_id, exc,
                            delay)
                self._wait(delay)

    def _recover(self) -> None:
        """Deal with what a previous, dead agent left in the folder (see the module docstring)."""
        state = cfgmod.state_load(self.config_path)
        if not self.clock.synced and isinstance(state.get("clock_offset_s"), int | float):
            self.clock.assume_wall_offset(state["clock_offset_s"])
        try:
            pending = cfgmod.pending_load(self.config_path)
        except cfgmod.PendingCorrupt as exc:
            log.error("discarding the result left by the previous run: %s", exc)
            cfgmod.pending_clear(self.config_path)
            pending = None
        if pending is not None:
            cfgmod.state_clear(self.config_path)
            self._deliver_pending_after_restart(pending)
            if self._auth_error is not None:
                raise self._auth_error
            return
        cfgmod.pending_clear(self.config_path)  # an update file whose manifest was never written
        task_id = state.get("task_id")
        if not isinstance(task_id, int) or isinstance(task_id, bool):
            cfgmod.state_clear(self.config_path)
            return
        current = _CurrentTask(task_id, parse_timestamp(state.get("deadline")))
        if not self.clock.synced:  # ask the server's time before judging the deadline (this machine's may be off)
            try:
                self.heartbeat()
            except AuthError:
                raise
            except ClientError as exc:
                log.info("cannot reach the server yet (%s); judging task %s's deadline by the clock estimate",
                         exc, task_id)
        if self._unwanted(current):
            log.info("task %s was interrupted by a restart and its deadline has passed; the server re-issues it",
                     task_id)
        else:
            log.warning("task %s was interrupted by a restart; reporting it as failed", task_id)
            self._report_failure(current, "agent restarted")
            if self._auth_error is not None:
                raise self._auth_error
        cfgmod.state_clear(self.config_path)

    def _deliver_pending_after_restart(self, pending: cfgmod.PendingResult) -> None:
        if not self.clock.synced and pending.clock_offset_s is not None:
            self.clock.assume_wall_offset(pending.clock_offset_s)
        log.info("delivering the result of task %s, finished before the agent restarted (%s)", pending.task_id,
                 pending.describe())
        current = _CurrentTask(pending.task_id, parse_timestamp(pending.deadline))
        self._current = current
        self._set_state("busy", pending.task_id, 1.0)
        beat = _Heartbeater(self, self.client.clone())
        beat.start()
        try:
            self._deliver_result(pending, current)
        finally:
            beat.stop()
            self._current = None
            self._set_state("idle")


def _iso(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
