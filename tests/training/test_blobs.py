"""Blobs on local disk are never seen half written, are checked against their sha256 when written and
when read, and what a killed write leaves behind is cleaned up."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import subprocess
import sys
import time

import pytest

from diloco.checkpoint import load_weights
from training import blobs, services
from training.models import Checkpoint, checkpoint_storage_name

from .conftest import stored_files
from .factories import TINY_CONFIG

pytestmark = pytest.mark.django_db

DATA = b"weights " * 4096
SHA = hashlib.sha256(DATA).hexdigest()
NAME = checkpoint_storage_name(SHA)


def _temps(root) -> list[str]:
    return [f for f in stored_files(root) if os.path.basename(f).startswith(".")]


def _age(path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


# --- writing ---------------------------------------------------------------------------------------


def test_a_write_lands_whole_under_its_name_and_leaves_no_temporary_file(checkpoint_storage):
    blobs.blob_write(NAME, DATA, content_addressed=True)
    assert (checkpoint_storage / NAME).read_bytes() == DATA
    assert stored_files(checkpoint_storage) == [NAME]
    assert oct((checkpoint_storage / NAME).stat().st_mode & 0o777) == oct(0o644)


def test_a_write_that_dies_before_the_rename_leaves_nothing_under_the_name(checkpoint_storage, monkeypatch):
    def killed(src, dst):
        raise KeyboardInterrupt  # what a SIGTERM/SIGINT mid-write looks like to the writer

    monkeypatch.setattr(blobs.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        blobs.blob_write(NAME, DATA, content_addressed=True)
    assert stored_files(checkpoint_storage) == []


def test_replacing_a_blob_is_atomic_for_a_reader_that_has_it_open(checkpoint_storage):
    blobs.blob_write("outer/run-1.safetensors", b"old state")
    with open(checkpoint_storage / "outer/run-1.safetensors", "rb") as reader:
        blobs.blob_write("outer/run-1.safetensors", b"new state, longer")
        assert reader.read() == b"old state"  # the old file, whole, not a mix
    assert blobs.blob_read("outer/run-1.safetensors") == b"new state, longer"


def test_a_truncated_content_addressed_blob_is_replaced_not_kept(checkpoint_storage, caplog):
    """What a killed write of an older build left: a prefix of the right bytes under the final name."""
    (checkpoint_storage / NAME).parent.mkdir(parents=True)
    (checkpoint_storage / NAME).write_bytes(DATA[: len(DATA) // 3])

    with caplog.at_level(logging.WARNING, logger="training.blobs"):
        blobs.blob_write(NAME, DATA, content_addressed=True, sha256=SHA)

    assert (checkpoint_storage / NAME).read_bytes() == DATA
    assert "writing it again" in caplog.text


def test_a_good_content_addressed_blob_is_left_alone(checkpoint_storage):
    blobs.blob_write(NAME, DATA, content_addressed=True)
    inode = (checkpoint_storage / NAME).stat().st_ino
    blobs.blob_write(NAME, DATA, content_addressed=True)
    assert (checkpoint_storage / NAME).stat().st_ino == inode


def test_a_write_whose_stored_bytes_do_not_match_the_sha256_raises_and_keeps_nothing(checkpoint_storage):
    with pytest.raises(blobs.BlobCorrupt) as caught:
        blobs.blob_write("updates/task-1.safetensors", DATA, sha256="0" * 64)
    assert caught.value.actual == SHA
    assert stored_files(checkpoint_storage) == []


def test_a_truncated_checkpoint_is_rewritten_when_the_same_weights_are_saved_again(checkpoint_storage):
    """Through the service: identical weights (same seed) map to the same name; the second save must not
    trust the damaged file it finds there."""
    first = services.community_model_ensure(slug="a", name="A", arch="byte-gpt", config=TINY_CONFIG, seed=7)
    sha = first.current_checkpoint_id
    path = checkpoint_storage / checkpoint_storage_name(sha)
    good = path.read_bytes()
    path.write_bytes(good[:100])
    blobs.clear_caches()

    second = services.community_model_ensure(slug="b", name="B", arch="byte-gpt", config=TINY_CONFIG, seed=7)

    assert second.current_checkpoint_id == sha
    assert path.read_bytes() == good
    assert load_weights(blobs.checkpoint_bytes(sha))[1]["config"] == TINY_CONFIG


# --- cleaning up after killed writes -------------------------------------------------------------------


def test_temporary_files_of_dead_writes_are_removed_and_live_ones_kept(checkpoint_storage):
    folder = checkpoint_storage / "updates" / "run-1" / "round-1"
    folder.mkdir(parents=True)
    dead = folder / ".task-1-abc.safetensors.x1y2.part"
    just_made = folder / ".task-2-def.safetensors.z3w4.part"
    live = folder / ".task-3-ghi.safetensors.q5r6.part"
    ancient = folder / ".task-4-jkl.safetensors.s7t8.part"
    for path in (dead, just_made, live, ancient):
        path.write_bytes(b"part of a write")
    _age(dead, blobs.TEMP_GRACE_S + 30)
    _age(live, blobs.TEMP_GRACE_S + 30)
    _age(ancient, blobs.STALE_TEMP_S + 30)
    (folder / ".keep").write_bytes(b"not ours")

    with open(live, "rb") as writer:
        fcntl.flock(writer.fileno(), fcntl.LOCK_EX)  # what a writer still at work holds
        removed = blobs.blob_sweep_temp()

    assert sorted(removed) == sorted([str(dead), str(ancient)])
    assert just_made.exists() and live.exists() and (folder / ".keep").exists()


def test_a_write_killed_9_mid_way_leaves_a_temporary_file_the_next_sweep_removes(tmp_path, settings):
    """A real process, killed with SIGKILL while its write is under way: nothing appears under the
    blob's name, and the half-written temporary file is removed once its writer is gone."""
    media = tmp_path / "media"
    settings.STORAGES = {**settings.STORAGES, "checkpoints": {
        "BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": str(media / "checkpoints")}}}
    script = ("import os, time, django; django.setup(); from training import blobs; "
              "os.fsync = lambda fd: time.sleep(600); "  # the write is under way until killed
              "blobs.blob_write('ab/big.safetensors', b'x' * 5_000_000)")
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "agora.settings", "AGORA_MEDIA_ROOT": str(media),
           "AGORA_CHECKPOINT_STORAGE": "filesystem"}
    env.pop("AGORA_S3_BUCKET", None)
    writer = subprocess.Popen([sys.executable, "-c", script], env=env)
    folder = media / "checkpoints" / "ab"
    try:
        deadline = time.monotonic() + 60
        while not (folder.is_dir() and any(p.stat().st_size == 5_000_000 for p in folder.iterdir())):
            assert writer.poll() is None and time.monotonic() < deadline, "the writer never got going"
            time.sleep(0.1)
        (temp,) = list(folder.iterdir())
        _age(temp, blobs.TEMP_GRACE_S + 30)
        assert blobs.blob_sweep_temp() == []  # its writer is alive: kept
    finally:
        writer.kill()
        writer.wait(10)

    assert not (folder / "big.safetensors").exists()
    assert blobs.blob_sweep_temp() == [str(temp)]
    assert list(folder.iterdir()) == []


def test_a_write_clears_stale_temporary_files_in_its_own_folder(checkpoint_storage):
    folder = (checkpoint_storage / NAME).parent
    folder.mkdir(parents=True)
    stale = folder / f".{SHA}.safetensors.dead.part"
    stale.write_bytes(DATA[:10])
    _age(stale, blobs.TEMP_GRACE_S + 30)

    blobs.blob_write(NAME, DATA, content_addressed=True)

    assert stored_files(checkpoint_storage) == [NAME]


def test_sweep_blobs_command_reports_what_it_removed(checkpoint_storage):
    from io import StringIO

    from django.core.management import call_command

    folder = checkpoint_storage / "ab"
    folder.mkdir(parents=True)
    stale = folder / ".x.safetensors.1234.part"
    stale.write_bytes(b"x")
    _age(stale, 120)
    out = StringIO()
    call_command("sweep_blobs", "--older-than", "60", stdout=out)
    assert not stale.exists()
    assert "removed 1 temporary file" in out.getvalue()


# --- reading ------------------------------------------------------------------------------------


def test_reading_with_a_sha256_refuses_damaged_bytes(checkpoint_storage, caplog):
    blobs.blob_write(NAME, DATA, content_addressed=True)
    assert blobs.blob_read(NAME, sha256=SHA) == DATA
    (checkpoint_storage / NAME).write_bytes(DATA[:-1] + b"X")
    with caplog.at_level(logging.ERROR, logger="training.blobs"), pytest.raises(blobs.CheckpointCorrupt):
        blobs.checkpoint_bytes(SHA)
    assert SHA in caplog.text


def test_open_verified_gives_the_files_length_and_notices_a_changed_file(checkpoint_storage):
    blobs.blob_write(NAME, DATA, content_addressed=True)
    fh, length = blobs.blob_open_verified(NAME, SHA)
    with fh:
        assert length == len(DATA) and fh.read() == DATA

    # Damaged in place after it was verified once (the check is remembered per file version).
    with open(checkpoint_storage / NAME, "r+b") as f:
        f.write(b"XX")
    _age(checkpoint_storage / NAME, 5)
    with pytest.raises(blobs.BlobCorrupt):
        blobs.blob_open_verified(NAME, SHA)
    with pytest.raises(FileNotFoundError):
        blobs.blob_open_verified("ff/" + "f" * 64 + ".safetensors", "f" * 64)


# --- the download ------------------------------------------------------------------------------


@pytest.fixture
def model():
    return services.community_model_ensure(slug="demo", name="Demo", arch="byte-gpt", config=TINY_CONFIG, seed=3)


def test_download_sends_the_files_true_length_not_the_rows(client, model):
    sha = model.current_checkpoint_id
    Checkpoint.objects.filter(sha256=sha).update(size=12)  # a row that disagrees with the file
    response = client.get(f"/api/v1/checkpoints/{sha}")
    assert response.status_code == 200
    body = b"".join(response.streaming_content)
    assert int(response["Content-Length"]) == len(body) > 12
    assert hashlib.sha256(body).hexdigest() == sha


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_checkpoint_is_never_served(client, model, checkpoint_storage, caplog, damage):
    sha = model.current_checkpoint_id
    path = checkpoint_storage / checkpoint_storage_name(sha)
    assert client.get(f"/api/v1/checkpoints/{sha}").status_code == 200  # verified once, then damaged
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2] if damage == "truncate" else good[:-1] + bytes([good[-1] ^ 1]))
    _age(path, 5)

    with caplog.at_level(logging.ERROR, logger="training.blobs"):
        response = client.get(f"/api/v1/checkpoints/{sha}")

    assert response.status_code == 409
    assert response.json()["error"] == "checkpoint_corrupt"
    assert sha in response.json()["detail"]
    assert "refusing to serve" in caplog.text


def test_a_checkpoint_missing_from_storage_is_a_clear_4xx(client, model, checkpoint_storage):
    sha = model.current_checkpoint_id
    (checkpoint_storage / checkpoint_storage_name(sha)).unlink()
    response = client.get(f"/api/v1/checkpoints/{sha}")
    assert response.status_code == 409
    assert response.json()["error"] == "checkpoint_missing"


def test_storage_that_cannot_be_read_answers_503_for_the_agent_to_retry(client, model, monkeypatch):
    def broken(name, sha256):
        raise ConnectionError("storage endpoint unreachable")

    monkeypatch.setattr(blobs, "blob_open_verified", broken)
    response = client.get(f"/api/v1/checkpoints/{model.current_checkpoint_id}")
    assert response.status_code == 503
    assert response.json()["error"] == "storage_unavailable"


def test_the_beat_sweeps_blob_storage_for_dead_writes(checkpoint_storage, settings):
    from agora.celery import app
    from training.tasks import sweep_blobs

    entry = settings.CELERY_BEAT_SCHEDULE["training-sweep-blobs"]
    assert entry["task"] == sweep_blobs.name and entry["task"] in app.tasks
    dead = checkpoint_storage / "outer" / "run-3" / ".round-2-tok.safetensors.ab12.part"
    dead.parent.mkdir(parents=True)
    dead.write_bytes(b"half an outer state")
    _age(dead, blobs.TEMP_GRACE_S + 30)
    assert sweep_blobs() == 1
    assert not dead.exists()
