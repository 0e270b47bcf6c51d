"""The agent installs and runs on a volunteer's machine without Django (DESIGN.md: workers -> diloco only)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVER_PACKAGES = ("django", "rest_framework", "celery", "agora", "governance", "marketplace", "training", "ledger")


def test_agent_modules_import_and_run_with_django_unavailable():
    code = f"""
import sys
for name in {SERVER_PACKAGES!r}:
    sys.modules[name] = None  # any import of these now raises ImportError
import workers.cli, workers.agent, workers.runner, workers.client, workers.config, workers.hardware, workers.bench
import diloco.models, diloco.data, diloco.guardrails, diloco.inner, diloco.codecs, diloco.checkpoint
import tempfile, pathlib
path = pathlib.Path(tempfile.mkdtemp()) / "worker.json"
assert workers.cli.main(["pause", "--config", str(path)]) == 0
assert (path.parent / "paused").exists()
print("agent ok")
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "agent ok" in result.stdout
    assert "ImportError" not in result.stderr


def test_no_server_imports_in_the_agent_source():
    pattern = re.compile(rf"^\s*(from|import)\s+({'|'.join(SERVER_PACKAGES)})\b", re.MULTILINE)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "workers").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
