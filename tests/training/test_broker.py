"""The embedded default's filesystem broker never hands a worker half a message, and an unreadable one
does not stop the worker (a round check it carried is caught up by the tick)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from django.conf import settings
from kombu import Connection

from agora import broker


@pytest.fixture
def connection(tmp_path):
    folder = tmp_path / "queue"
    folder.mkdir()
    options = {"data_folder_in": str(folder), "data_folder_out": str(folder), "store_processed": False,
               "control_folder": str(tmp_path / "control")}
    with Connection("filesystem://", transport="agora.broker:Transport", transport_options=options) as conn:
        yield conn, folder


def test_a_message_is_only_visible_once_complete(connection, monkeypatch):
    conn, folder = connection
    seen_while_writing = []
    replace = os.replace

    def spy(src, dst):
        seen_while_writing.append(sorted(p for p in os.listdir(folder) if p.endswith(f".{name}.msg")))
        assert os.path.getsize(src) > 0
        replace(src, dst)

    monkeypatch.setattr(broker.os, "replace", spy)
    # kombu's in-process broker state (exchanges, bindings) outlives a connection, and other tests use the
    # "celery" queue through Celery itself: a queue of this test's own.
    name = f"visible-{uuid.uuid4().hex[:8]}"
    queue = conn.SimpleQueue(name)
    queue.put({"round_id": 7})
    assert seen_while_writing == [[]]  # nothing a reader takes existed before the payload was whole
    message = queue.get(timeout=1)
    assert message.payload == {"round_id": 7}
    message.ack()
    assert not [p for p in os.listdir(folder) if "partial" in p]
    queue.close()


def test_an_unreadable_message_is_skipped_not_fatal(connection):
    conn, folder = connection
    queue = conn.SimpleQueue("checks")  # kombu's in-process broker state outlives a connection: a queue per test
    # what a torn write used to leave; "0_" sorts before every real name ("<monotonic ms>_<uuid>"), so it is read first
    (folder / "0_broken.checks.msg").write_bytes(b"")
    queue.put({"round_id": 8})
    message = queue.get(timeout=1)
    assert message.payload == {"round_id": 8}
    message.ack()
    assert os.listdir(folder) == []
    queue.close()


def test_the_embedded_default_uses_it(tmp_path):
    """With no REDIS_URL (the embedded default), Celery's broker is this transport; checked in a fresh
    process so it runs whatever services this suite itself uses."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "CELERY_BROKER_URL", "DATABASE_URL")}
    env.update(AGORA_VAR_DIR=str(tmp_path), DJANGO_SETTINGS_MODULE="agora.settings", DJANGO_SECRET_KEY="x")
    code = (
        "import django; django.setup()\n"
        "from agora.celery import app\n"
        "from agora import broker\n"
        "assert app.conf.broker_url == 'filesystem://', app.conf.broker_url\n"
        "assert app.conf.broker_transport == 'agora.broker:Transport', app.conf.broker_transport\n"
        "with app.connection_for_write() as conn:\n"
        "    assert isinstance(conn.transport, broker.Transport), type(conn.transport)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=settings.BASE_DIR)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
