"""The agent wheel the server builds and serves: what a volunteer installs without a checkout."""

from __future__ import annotations

import ast
import email.parser
import hashlib
import re
import zipfile
from pathlib import Path

import pytest
from django.urls import reverse

import workers
from marketplace import agent_package

# Names that exist only from Python 3.11: the agent promises 3.10.
PY311_ONLY = {("datetime", "UTC"), ("tomllib", None), ("enum", "StrEnum"), ("typing", "Self"),
              ("asyncio", "TaskGroup"), ("builtins", "ExceptionGroup")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> agent_package.AgentWheel:
    return agent_package.build_wheel(tmp_path_factory.mktemp("agent-wheel"))


def _metadata(path: Path) -> email.message.Message:
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(zf.read(name).decode())


def test_wheel_is_the_agent_with_ranges_for_python_310_to_313(wheel):
    meta = _metadata(wheel.path)
    assert meta["Name"] == "agora-worker"
    assert meta["Version"] == workers.__version__ == wheel.version
    assert wheel.filename == f"agora_worker-{workers.__version__}-py3-none-any.whl"
    assert set(meta["Requires-Python"].split(",")) == {">=3.10", "<3.14"}
    requires = meta.get_all("Requires-Dist")
    torch_req = next(r for r in requires if r.startswith("torch"))
    assert torch_req.startswith("torch>="), torch_req
    pinned = [r for r in requires if "==" in r.split(";")[0]]
    assert not pinned, f"the volunteer's package must use ranges, not pins: {pinned}"
    assert {"hf", "cuda"} <= set(meta.get_all("Provides-Extra"))
    assert any(r.startswith("transformers") and 'extra == "hf"' in r for r in requires)


def test_wheel_holds_only_the_agent_and_diloco_and_its_script(wheel):
    with zipfile.ZipFile(wheel.path) as zf:
        names = zf.namelist()
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"workers", "diloco"}
    assert "workers/cli.py" in names and "diloco/codecs.py" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert "agora-worker = workers.cli:main" in entry_points


def _imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                yield node.module, alias.name


def test_packaged_code_needs_no_server_and_parses_as_python_310(wheel):
    problems = []
    with zipfile.ZipFile(wheel.path) as zf:
        for name in zf.namelist():
            if not name.endswith(".py"):
                continue
            source = zf.read(name).decode()
            try:
                tree = ast.parse(source, filename=name, feature_version=(3, 10))
            except SyntaxError as exc:
                problems.append(f"{name}: not Python 3.10 syntax: {exc}")
                continue
            for module, attr in _imports(tree):
                root = module.split(".")[0]
                if root in {"django", "rest_framework", "celery", "agora", "governance", "marketplace",
                            "training", "ledger", "core"}:
                    problems.append(f"{name}: imports {module}")
                if (module, attr) in PY311_ONLY or (module, None) in PY311_ONLY:
                    problems.append(f"{name}: {module}.{attr or ''} needs Python 3.11")
            if re.search(r"\bdatetime\.UTC\b", source):
                problems.append(f"{name}: datetime.UTC needs Python 3.11")
    assert not problems, "\n".join(problems)


def test_same_sources_build_the_same_bytes(wheel, tmp_path):
    again = agent_package.build_wheel(tmp_path)
    assert again.sha256 == wheel.sha256


@pytest.mark.django_db
def test_server_serves_the_wheel_and_the_page_shows_how_to_install_it(client, member, settings):
    built = agent_package.current_wheel()
    client.force_login(member)
    page = client.get(reverse("marketplace:add_worker")).content.decode()
    url = f"{settings.AGORA_PUBLIC_URL.rstrip('/')}/agent/{built.filename}"
    assert f"pip install {url}" in page
    assert built.sha256 in page
    assert f"docker build -t agora-worker {settings.AGORA_PUBLIC_URL.rstrip('/')}/agent/Dockerfile" in page

    client.logout()  # the package is public: a volunteer's machine has no session
    response = client.get(f"/agent/{built.filename}")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/zip"
    body = b"".join(response.streaming_content)
    assert hashlib.sha256(body).hexdigest() == built.sha256 == response["X-Content-SHA256"]
    assert body == built.path.read_bytes()

    dockerfile = client.get("/agent/Dockerfile")
    assert dockerfile.status_code == 200
    assert f"ARG AGENT_WHEEL_URL={url}\n" in dockerfile.content.decode()
    assert "--gpus all" in dockerfile.content.decode()


@pytest.mark.django_db
@pytest.mark.parametrize("name", [
    "agora_worker-9.9.9-py3-none-any.whl",     # a version this server does not offer
    "evil.whl", "agora_worker-0.1.0-py3-none-any.whl.partial", ".build.lock", "..%2Fsettings.py",
])
def test_only_the_current_wheel_is_served(client, name):
    agent_package.current_wheel()
    assert client.get(f"/agent/{name}").status_code == 404


def test_stale_wheel_is_rebuilt_when_the_sources_change(settings, tmp_path, monkeypatch):
    settings.VAR_DIR = tmp_path
    first = agent_package.current_wheel()
    assert agent_package.current_wheel(build=False) == first
    monkeypatch.setattr(agent_package, "_sources_mtime", lambda: first.path.stat().st_mtime + 10)
    assert agent_package.current_wheel(build=False) is None
    rebuilt = agent_package.current_wheel()
    assert rebuilt.path == first.path and rebuilt.sha256 == first.sha256
