"""What the agent keeps from one round of a run to the next (the inner AdamW state, the error-feedback buffer
of a sparse codec): held in memory for the run it is working on, and written to disk behind the training's
back, so that a restarted agent finds it too.

Writing that state where the round waits for it (serialise, write, fsync: about 300 MB for a 25M-parameter
model with a sparse codec) and reading it back at the next claim cost about two seconds of every round on a
CPU, time in which the agent neither trained nor uploaded. Here :meth:`StateKeeper.put` keeps the value for
:meth:`StateKeeper.get` in the same process and hands the write to one writer thread:

- the file of the previous round is removed at once, so a crash before the new one is written leaves no
  file rather than an older one (an older error-feedback buffer would send again what was already sent);
  the next start then begins that state afresh, as it does with a damaged file;
- writes are atomic and private (``workers.config.write_private_file``), one at a time, in order; a newer
  ``put`` for the same file replaces a write that has not begun;
- a write that fails (a full disk) is logged and costs nothing but the copy on disk;
- memory holds the state of one run, the latest one put (another run's state is read from its file);
- :meth:`flush` waits for the writes; the agent calls it before it exits.

Values must not be changed after ``put``: the writer serialises them later (the inner loop exports fresh
tensors and the error-feedback buffer makes new ones each round, so nothing is shared).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from workers.config import write_private_file

log = logging.getLogger("agora.worker.keep")


class StateKeeper:
    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._memory: dict[Path, object] = {}
        self._run: object = None
        self._pending: dict[Path, Callable[[], bytes]] = {}  # the newest write asked for each file, not begun
        self._writing: Path | None = None  # the file being written now
        self._thread: threading.Thread | None = None

    def get(self, path: Path, run_id) -> object | None:
        """The value last put for ``path`` by this process for run ``run_id``, or None (read the file)."""
        with self._lock:
            return self._memory.get(Path(path)) if run_id == self._run else None

    def put(self, path: Path, value: object, encode: Callable[[], bytes], *, run_id) -> None:
        """Keep ``value`` for the next :meth:`get` and write ``encode()`` to ``path`` soon."""
        path = Path(path)
        with self._lock:
            # An older value of this file still being written would land after the removal below.
            self._lock.wait_for(lambda: self._writing != path)
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("cannot remove the previous %s (%s)", path.name, exc)
            if run_id != self._run:
                self._memory.clear()
                self._run = run_id
            self._memory[path] = value
            self._pending[path] = encode
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._write_loop, name="agora-keep", daemon=True)
                self._thread.start()
            self._lock.notify_all()

    def forget(self, path: Path) -> None:
        """Drop what is kept for ``path`` (memory and a write not begun), e.g. a state found unusable."""
        path = Path(path)
        with self._lock:
            self._memory.pop(path, None)
            self._pending.pop(path, None)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every write asked for is on disk (or failed); False if ``timeout`` passed first."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._pending and self._writing is None, timeout)

    def _write_loop(self) -> None:
        while True:
            with self._lock:
                if not self._lock.wait_for(lambda: self._pending, timeout=30.0):
                    self._thread = None  # idle: the next put starts a new writer
                    return
                path = next(iter(self._pending))
                encode = self._pending.pop(path)
                self._writing = path
            try:
                write_private_file(path, encode())
            except Exception as exc:  # the state stays in memory; only the copy for a restart is lost
                log.warning("cannot write %s (%s); a restart will begin it afresh", path, exc)
            finally:
                with self._lock:
                    self._writing = None
                    self._lock.notify_all()
