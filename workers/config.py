"""The agent's files: the config (server, worker id, worker token), the task state and the pause file.

All live in one directory, by default ``~/.config/agora/`` (``$XDG_CONFIG_HOME/agora`` when set):

- ``worker.json``: written once by ``agora-worker enroll``; holds the worker token, so it is created with
  mode 0600 and replaced atomically (never readable by others, never half-written).
- ``state.json``: the task in progress, so a restarted agent can tell the server what happened to it.
- ``result.json`` + ``result.safetensors``: a finished result not yet delivered (the pending result). The
  update is written first, then the manifest (metrics, deadline, the update's sha256), each atomically; the
  manifest is the commit point, and a manifest whose update file does not match its sha256 is discarded.
- ``agent.lock``: held (``flock``) by the running agent for its whole life and holding its pid, so a second
  agent on the same folder refuses to start and ``agora-worker status`` can tell a live agent from a dead one.
  The kernel drops the lock when the process dies, however it dies.
- ``paused``: exists while the volunteer has paused the agent (``agora-worker pause`` / ``resume`` / SIGUSR1).

The cache (checkpoints, optimizer states, datasets) defaults to ``<config dir>/cache``; override it with
``cache_dir`` in the config file or ``AGORA_WORKER_CACHE``.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

CONFIG_ENV = "AGORA_WORKER_CONFIG"
CACHE_ENV = "AGORA_WORKER_CACHE"


class ConfigError(Exception):
    """The config file is missing, unreadable or incomplete; the message says what to do."""


def default_config_path() -> Path:
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "agora" / "worker.json"


def resolve_config_path(path: str | os.PathLike | None) -> Path:
    return Path(path).expanduser() if path else default_config_path()


def write_private_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically with ``mode``: a temporary file in the same directory is
    created with ``os.open(..., mode)`` (so the secret is never readable by others, not even for an
    instant), fsynced, then renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # the umask may have removed bits we asked for; never adds any for others
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable: without this a power cut can bring back the old name's contents."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def write_json(path: Path, value: dict, mode: int = 0o600) -> None:
    write_private_file(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode(), mode)


@dataclass
class WorkerConfig:
    server: str
    worker_id: int
    worker_token: str
    name: str = ""
    agent_version: str = ""
    enrolled_at: str = ""
    cache_dir: str = ""
    path: Path = field(default_factory=default_config_path, repr=False, compare=False)

    def __repr__(self) -> str:  # never print the token
        return f"WorkerConfig(server={self.server!r}, worker_id={self.worker_id}, name={self.name!r})"

    @property
    def directory(self) -> Path:
        return self.path.parent

    @property
    def cache_path(self) -> Path:
        if os.environ.get(CACHE_ENV):
            return Path(os.environ[CACHE_ENV]).expanduser()
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        return self.directory / "cache"

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("path")
        if not data["cache_dir"]:
            data.pop("cache_dir")
        return data


def save_config(config: WorkerConfig) -> Path:
    write_json(config.path, config.to_json())
    return config.path


def load_config(path: str | os.PathLike | None = None) -> WorkerConfig:
    config_path = resolve_config_path(path)
    try:
        raw = config_path.read_text()
    except FileNotFoundError:
        raise ConfigError(
            f"no worker config at {config_path}: enroll this machine first with "
            "`agora-worker enroll --server URL --token ENROLLMENT_TOKEN`"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {config_path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"{config_path} is not valid JSON ({exc}); enroll again to recreate it") from exc
    missing = [k for k in ("server", "worker_id", "worker_token") if not data.get(k)] if isinstance(data, dict) else [
        "server", "worker_id", "worker_token"]
    if missing:
        raise ConfigError(f"{config_path} lacks {', '.join(missing)}; enroll again to recreate it")
    known = {f for f in WorkerConfig.__dataclass_fields__ if f != "path"}
    return WorkerConfig(**{k: v for k, v in data.items() if k in known}, path=config_path)


def config_is_private(path: Path) -> bool:
    """True when no one but the owner can read or write the file."""
    return not (stat.S_IMODE(path.stat().st_mode) & 0o077)


# --- pause file and task state --------------------------------------------------------------------


def pause_path(config_path: Path) -> Path:
    return config_path.parent / "paused"


def state_path(config_path: Path) -> Path:
    return config_path.parent / "state.json"


def is_paused(config_path: Path) -> bool:
    return pause_path(config_path).exists()


def set_paused(config_path: Path, paused: bool) -> bool:
    """Create or remove the pause file; returns whether the agent was paused before."""
    p = pause_path(config_path)
    before = p.exists()
    if paused and not before:
        write_private_file(p, b"paused by the volunteer\n")
    elif not paused and before:
        p.unlink(missing_ok=True)
    return before


def state_load(config_path: Path) -> dict:
    try:
        value = json.loads(state_path(config_path).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def state_save(config_path: Path, value: dict) -> None:
    write_json(state_path(config_path), value)


def state_clear(config_path: Path) -> None:
    state_path(config_path).unlink(missing_ok=True)


# --- the pending result ---------------------------------------------------------------------------


class PendingCorrupt(Exception):
    """The pending result on disk is incomplete or damaged; it cannot be delivered."""


@dataclass
class PendingResult:
    task_id: int
    deadline: str | None
    metrics: dict
    update: bytes
    run_id: int | None = None
    round: int | None = None
    finished_at: str = ""
    clock_offset_s: float | None = None  # server time minus the wall clock when it finished

    def describe(self) -> str:
        return (f"task {self.task_id} (run {self.run_id}, round {self.round}), {len(self.update)} bytes, "
                f"deadline {self.deadline or 'unknown'}")


def pending_manifest_path(config_path: Path) -> Path:
    return config_path.parent / "result.json"


def pending_update_path(config_path: Path) -> Path:
    return config_path.parent / "result.safetensors"


def pending_save(config_path: Path, result: PendingResult) -> None:
    """Write the update, then the manifest that names its sha256 (the commit point), both atomically."""
    write_private_file(pending_update_path(config_path), result.update)
    write_json(pending_manifest_path(config_path), {
        "task_id": result.task_id, "run_id": result.run_id, "round": result.round, "deadline": result.deadline,
        "metrics": result.metrics, "finished_at": result.finished_at, "clock_offset_s": result.clock_offset_s,
        "update_sha256": hashlib.sha256(result.update).hexdigest(), "update_bytes": len(result.update)})


def pending_manifest(config_path: Path) -> dict | None:
    """The manifest alone (for ``status``), or None when there is none; raises PendingCorrupt if unreadable."""
    try:
        raw = pending_manifest_path(config_path).read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PendingCorrupt(f"cannot read {pending_manifest_path(config_path)}: {exc}") from exc
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise PendingCorrupt(f"{pending_manifest_path(config_path)} is not JSON: {exc}") from exc
    if (not isinstance(value, dict) or not isinstance(value.get("task_id"), int) or isinstance(value["task_id"], bool)
            or not isinstance(value.get("metrics"), dict) or not isinstance(value.get("update_sha256"), str)):
        raise PendingCorrupt(f"{pending_manifest_path(config_path)} lacks task_id, metrics or update_sha256")
    return value


def pending_load(config_path: Path) -> PendingResult | None:
    """The pending result, verified against its sha256; None when there is none."""
    manifest = pending_manifest(config_path)
    if manifest is None:
        return None
    try:
        update = pending_update_path(config_path).read_bytes()
    except OSError as exc:
        raise PendingCorrupt(f"the update of task {manifest['task_id']} is missing: {exc}") from exc
    if hashlib.sha256(update).hexdigest() != manifest["update_sha256"]:
        raise PendingCorrupt(f"the update of task {manifest['task_id']} does not match its sha256")
    deadline = manifest.get("deadline")
    offset = manifest.get("clock_offset_s")
    return PendingResult(task_id=manifest["task_id"], deadline=deadline if isinstance(deadline, str) else None,
                         metrics=manifest["metrics"], update=update, run_id=manifest.get("run_id"),
                         round=manifest.get("round"), finished_at=str(manifest.get("finished_at") or ""),
                         clock_offset_s=float(offset) if isinstance(offset, int | float) else None)


def pending_clear(config_path: Path) -> None:
    """Remove the manifest first: an update file without a manifest is never delivered."""
    pending_manifest_path(config_path).unlink(missing_ok=True)
    pending_update_path(config_path).unlink(missing_ok=True)


# --- the agent lock -------------------------------------------------------------------------------


def lock_path(config_path: Path) -> Path:
    return config_path.parent / "agent.lock"


class AgentLocked(Exception):
    """Another agent holds this config folder's lock."""

    def __init__(self, path: Path, pid: int | None):
        self.path = path
        self.pid = pid
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"another agent ({who}) is already running on {path.parent}; stop it first "
                         f"(one agent per config folder; give a second agent its own --config)")


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class AgentLock:
    """An exclusive ``flock`` on ``<config dir>/agent.lock``, held while the agent runs (POSIX only).

    flock belongs to the open file, so the kernel releases it the moment the process dies (kill -9 and power
    cuts included): a lock that can be taken proves that no agent is alive on this folder any more."""

    def __init__(self, config_path: Path):
        self.path = lock_path(config_path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> AgentLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            for attempt in range(5):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if attempt == 4:
                        raise
                    time.sleep(0.05)  # ``lock_holder`` (status) holds a shared lock for an instant
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise AgentLocked(self.path, pid) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> AgentLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_holder(config_path: Path) -> int | None:
    """The pid of the live agent that holds the lock (0 when it cannot be read), or None when none does."""
    import fcntl

    try:
        fd = os.open(lock_path(config_path), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
