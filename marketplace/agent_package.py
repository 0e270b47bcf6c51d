"""The volunteer's agent as a wheel the server builds and serves, so installing it needs no checkout.

The wheel (`agora_worker-<version>-py3-none-any.whl`) holds the `workers` and `diloco` packages and the
project file in `agent/pyproject.toml`, whose dependencies are ranges: it installs beside the PyTorch build a
volunteer already has. It is built with the standard setuptools backend (`pip wheel`, no network, no build
isolation) into ``AGORA_VAR_DIR/agent/``, with a fixed ``SOURCE_DATE_EPOCH`` so the same sources give the same
bytes and the page can print a sha256 a volunteer can check.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

PACKAGES = ("workers", "diloco")
SOURCE_DATE_EPOCH = "1767225600"  # 2026-01-01: fixed, so a rebuild of the same sources is byte-identical
WHEEL_NAME_RE = re.compile(r"^agora_worker-[0-9][0-9A-Za-z.+-]*-py3-none-any\.whl$")


class AgentPackageError(RuntimeError):
    """The agent's wheel could not be built."""


@dataclass(frozen=True)
class AgentWheel:
    path: Path
    sha256: str
    version: str

    @property
    def filename(self) -> str:
        return self.path.name


def project_dir() -> Path:
    """The folder with the agent's `pyproject.toml` and README (next to the packages it ships)."""
    return Path(settings.BASE_DIR) / "agent"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise AgentPackageError(f"the {name!r} package is not installed beside the server")
    return Path(next(iter(spec.submodule_search_locations)))


def agent_version() -> str:
    """The agent's version, read from the project file (the single source of truth for the wheel)."""
    text = (project_dir() / "pyproject.toml").read_text(encoding="utf-8")
    match = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    if not match:
        raise AgentPackageError("agent/pyproject.toml has no version")
    return match.group(1)


def output_dir() -> Path:
    return Path(settings.VAR_DIR) / "agent"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _ignore(_dir, names):
    return [n for n in names if n == "__pycache__" or n.endswith((".pyc", ".pyo"))]


def build_wheel(out_dir: Path | None = None) -> AgentWheel:
    """Build the wheel into ``out_dir`` (default ``AGORA_VAR_DIR/agent``), replacing an older one atomically."""
    out_dir = Path(out_dir or output_dir())
    out_dir.mkdir(parents=True, exist_ok=True)
    version = agent_version()
    with tempfile.TemporaryDirectory(prefix="agora-agent-build-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(project_dir() / name, src / name)
        for name in PACKAGES:
            shutil.copytree(_package_dir(name), src / name, ignore=_ignore)
        built = Path(tmp) / "dist"
        env = dict(os.environ, SOURCE_DATE_EPOCH=SOURCE_DATE_EPOCH, PIP_NO_INDEX="1",
                   PIP_DISABLE_PIP_VERSION_CHECK="1")
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
             "--wheel-dir", str(built), str(src)],
            env=env, capture_output=True, text=True, timeout=300, cwd=tmp,
        )
        if proc.returncode != 0:
            raise AgentPackageError(f"building the agent wheel failed:\n{proc.stderr.strip()[-2000:]}")
        wheels = [p for p in built.iterdir() if WHEEL_NAME_RE.match(p.name)]
        if len(wheels) != 1:
            raise AgentPackageError(f"expected one agora_worker wheel, got {sorted(p.name for p in built.iterdir())}")
        wheel = wheels[0]
        final = out_dir / wheel.name
        partial = out_dir / f".{wheel.name}.partial"
        shutil.copyfile(wheel, partial)
        os.replace(partial, final)
    for old in out_dir.glob("agora_worker-*.whl"):
        if old.name != final.name:
            old.unlink(missing_ok=True)
    return AgentWheel(path=final, sha256=_sha256(final), version=version)


def _sources_mtime() -> float:
    newest = (project_dir() / "pyproject.toml").stat().st_mtime
    for name in PACKAGES:
        for path in _package_dir(name).rglob("*.py"):
            newest = max(newest, path.stat().st_mtime)
    return newest


def current_wheel(*, build: bool = True) -> AgentWheel | None:
    """The served wheel; built (once, under a file lock) when missing or older than the sources."""
    out_dir = output_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"agora_worker-{agent_version()}-py3-none-any.whl"
    path = out_dir / name
    if path.exists() and path.stat().st_mtime >= _sources_mtime():
        return AgentWheel(path=path, sha256=_sha256(path), version=agent_version())
    if not build:
        return None
    with (out_dir / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists() and path.stat().st_mtime >= _sources_mtime():
            return AgentWheel(path=path, sha256=_sha256(path), version=agent_version())
        return build_wheel(out_dir)
