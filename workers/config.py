"""The agent's files: the config (server, worker id, worker token), the task state and the pause file.

All live in one directory, by default ``~/.config/agora/`` (``$XDG_CONFIG_HOME/agora`` when set):

- ``worker.json``: written once by ``agora-worker enroll``; holds the worker token, so it is created with
  mode 0600 and replaced atomically (never readable by others, never half-written).
- ``state.json``: the task in progress, so a restarted agent can tell the server what happened to it.
- ``paused``: exists while the volunteer has paused the agent (``agora-worker pause`` / ``resume`` / SIGUSR1).

The cache (checkpoints, optimizer states, datasets) defaults to ``<config dir>/cache``; override it with
``cache_dir`` in the config file or ``AGORA_WORKER_CACHE``.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
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
