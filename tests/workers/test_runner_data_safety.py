"""The agent reads task datasets only within its own policy and filters data on RE2, whatever the server sends."""

from __future__ import annotations

import hashlib
import io
import socket

import pytest

from tests.workers.conftest import make_task
from workers.client import Client
from workers.runner import TaskError, TaskRunner

BODY = b"first document here\n\nsecond document there\n\n" + b"aaaa" * 40


@pytest.fixture
def make_runner(fake_server, tiny_checkpoint, tmp_path):
    data, sha, _ = tiny_checkpoint
    fake_server.on("GET", f"/api/v1/checkpoints/{sha}", (200, data))
    clients = []

    def make(**kwargs) -> TaskRunner:
        client = Client(fake_server.url, "wkr_secret")
        clients.append(client)
        return TaskRunner(client=client, cache_dir=tmp_path / "cache", **kwargs)

    yield make
    for client in clients:
        client.close()


def _task(source, sha256=None, guardrails=()):
    task = make_task(guardrails=list(guardrails))
    task["dataset"].update(source=source, sha256=sha256, shard_count=1, heldout_fraction=0.1)
    return task


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "corpus.txt").write_bytes(BODY)
    (tmp_path / "secret.txt").write_text("hunter2\n\nhunter3")
    (root / "escape").symlink_to(tmp_path / "secret.txt")
    (root / "zero").symlink_to("/dev/zero")
    return root


def test_file_sources_are_refused_by_default(make_runner, root):
    with pytest.raises(TaskError, match=r"'file:.*corpus.txt' refused: file sources are not allowed here"):
        make_runner().load_tokens(_task(f"file:{root}/corpus.txt"))


def test_a_file_under_the_agents_data_root_is_read(make_runner, root):
    tokens, info = make_runner(data_root=root).load_tokens(_task(f"file:{root}/corpus.txt"))
    assert tokens.numel() > 0 and info["documents"] >= 1


@pytest.mark.parametrize("source", ["file:/etc/shadow", "file:/proc/self/environ", "file:/dev/zero",
                                    "file:{root}/../secret.txt", "file:{root}/escape", "file:{root}/zero"])
def test_files_outside_the_data_root_are_refused(make_runner, root, source):
    source = source.format(root=root)
    with pytest.raises(TaskError, match="resolves outside the data root") as info:
        make_runner(data_root=root).load_tokens(_task(source))
    assert repr(source) in str(info.value)


def test_an_oversize_file_is_refused(make_runner, root):
    with pytest.raises(TaskError, match="over the limit of 64"):
        make_runner(data_root=root, max_dataset_bytes=64).load_tokens(_task(f"file:{root}/corpus.txt"))


@pytest.mark.parametrize("source", ["https://127.0.0.1:6379/x", "https://[::1]/x", "https://10.0.0.1/",
                                    "https://169.254.169.254/", "http://example.org/x"])
def test_https_to_private_addresses_and_plain_http_are_refused(make_runner, source, monkeypatch):
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("no connection may be made"))
    with pytest.raises(TaskError, match="non-public address|unsupported dataset source") as info:
        make_runner().load_tokens(_task(source, sha256="a" * 64))
    assert repr(source) in str(info.value)


class _Redirect:
    status = 302

    def __init__(self, location):
        self.location = location

    def getheader(self, name, default=None):
        return self.location if name.lower() == "location" else default

    def read(self, n=-1):
        return b""

    def close(self):
        pass


def test_names_and_redirects_to_private_addresses_are_refused(make_runner, monkeypatch):
    import diloco.data

    dns = {"corpus.example.org": ["93.184.215.14"], "sneaky.example.org": ["10.9.8.7"]}
    connections = []

    def fake_open(*, address, host, port, target, timeout):
        connections.append((address, host))
        return _Redirect("https://sneaky.example.org/x")

    monkeypatch.setattr(diloco.data, "resolve_host", lambda host, port: dns[host])
    monkeypatch.setattr(diloco.data, "open_https", fake_open)
    runner = make_runner()
    with pytest.raises(TaskError, match="sneaky.example.org resolves to non-public address 10.9.8.7"):
        runner.load_tokens(_task("https://sneaky.example.org/x", sha256="a" * 64))
    assert connections == []
    with pytest.raises(TaskError, match=r"'https://corpus.example.org/c.txt' refused \(redirected to "
                                        r"https://sneaky.example.org/x\)"):
        runner.load_tokens(_task("https://corpus.example.org/c.txt", sha256="a" * 64))
    assert connections == [("93.184.215.14", "corpus.example.org")]


def test_https_download_streams_under_the_cap(make_runner, monkeypatch):
    import diloco.data

    class Body:
        status = 200

        def __init__(self):
            self.stream = io.BytesIO(BODY)

        def getheader(self, name, default=None):
            return default

        def read(self, n=-1):
            return self.stream.read(n)

        def close(self):
            pass

    monkeypatch.setattr(diloco.data, "resolve_host", lambda host, port: ["93.184.215.14"])
    monkeypatch.setattr(diloco.data, "open_https", lambda **kwargs: Body())
    sha = hashlib.sha256(BODY).hexdigest()
    with pytest.raises(TaskError, match="more than 64 bytes"):
        make_runner(max_dataset_bytes=64).load_tokens(_task("https://corpus.example.org/c.txt", sha256=sha))
    tokens, _ = make_runner().load_tokens(_task("https://corpus.example.org/c.txt", sha256=sha))
    assert tokens.numel() > 0


def test_data_filters_run_on_re2_over_adversarial_documents(make_runner, root):
    (root / "evil.txt").write_bytes(b"a" * 100_000 + b"!\n\nharmless text\n\n" + b"ab" * 30_000)
    guardrail = {"id": 3, "title": "runs", "kind": "data_filter", "patterns": ["(a+)+$", "(x+x+)+y", "harmless"]}
    task = _task(f"file:{root}/evil.txt", guardrails=[guardrail])
    task["dataset"]["heldout_fraction"] = 0.0
    tokens, info = make_runner(data_root=root).load_tokens(task)
    assert info["dropped_by_guardrails"] == 1  # "harmless"; the runs of a end in "!" and do not match
    assert tokens.numel() == 100_001 + 2 + 60_000


def test_a_data_filter_re2_cannot_compile_fails_the_task_naming_it(make_runner):
    legacy = {"id": 8, "title": "Legacy", "kind": "data_filter", "patterns": [r"(\w+) \1"]}
    with pytest.raises(TaskError, match=r"guardrail #8 \(Legacy\) cannot be enforced"):
        make_runner().load_tokens(_task("builtin:python-docs", guardrails=[legacy]))
