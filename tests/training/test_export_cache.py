"""The export cache is bounded: the beat keeps the most recently downloaded versions and drops stale ones,
never a directory a download is reading, and a swept version is written again on its next download."""

import io
import os
import tarfile
import time

import pytest

from training import export, services

from .factories import TINY_CONFIG

pytestmark = pytest.mark.django_db
HOUR = 3600


@pytest.fixture
def var_dir(settings, tmp_path):
    settings.VAR_DIR = tmp_path / "var"
    return settings.VAR_DIR


def _entry(name: str, idle_s: float, now: float):
    path = export.export_root() / name
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    os.utime(path, (now - idle_s, now - idle_s))
    return path


def test_the_sweep_keeps_the_newest_and_drops_what_is_stale_or_beyond_the_bound(var_dir):
    now = time.time()
    fresh = _entry("m-v5-aa", 60, now)
    reading = _entry("m-v4-bb", 10 * 60, now)  # beyond the bound of 1, but used within the grace: kept
    surplus = _entry("m-v3-cc", 2 * HOUR, now)  # beyond the bound and idle past the grace: removed
    ancient = _entry("m-v1-ee", 30 * HOUR, now)  # idle for more than a day: removed
    dead_write = _entry(".tmp-killed", 2 * HOUR, now)
    live_write = _entry(".tmp-writing", 60, now)
    assert export.export_sweep(keep=1, max_age_s=24 * HOUR, now=now) == 3
    assert [p.exists() for p in (fresh, reading, surplus, ancient, dead_write, live_write)] == [
        True, True, False, False, False, True]
    # Within the bound, only age removes a directory.
    stale = _entry("m-v2-dd", 2 * HOUR, now)
    assert export.export_sweep(keep=10, max_age_s=HOUR, now=now) == 1
    assert not stale.exists() and fresh.exists() and reading.exists()


def test_an_empty_or_missing_cache_sweeps_nothing(var_dir):
    assert export.export_sweep(keep=0, max_age_s=0) == 0
    export.export_root().mkdir(parents=True)
    assert export.export_sweep(keep=0, max_age_s=0) == 0


def test_a_download_marks_its_directory_used_and_a_swept_version_exports_again(var_dir, client):
    services.community_model_ensure(slug="tiny-gpt", name="Tiny", arch="byte-gpt", config=TINY_CONFIG, seed=3)
    first = b"".join(client.get("/models/tiny-gpt/v1.tar.gz").streaming_content)
    (directory,) = export.export_root().iterdir()
    old = time.time() - 2 * HOUR
    os.utime(directory, (old, old))
    assert export.export_sweep(keep=5, max_age_s=HOUR) == 1 and not directory.exists()

    again = b"".join(client.get("/models/tiny-gpt/v1.tar.gz").streaming_content)
    assert again == first  # written again, byte for byte the same archive
    with tarfile.open(fileobj=io.BytesIO(again), mode="r:gz") as tar:
        assert "tiny-gpt-v1/model.safetensors" in tar.getnames()
    os.utime(directory, (old, old))
    b"".join(client.get("/models/tiny-gpt/v1.tar.gz").streaming_content)  # a cache hit touches it
    assert time.time() - directory.stat().st_mtime < HOUR
    assert export.export_sweep(keep=0, max_age_s=24 * HOUR) == 0 and directory.exists()


def test_the_beat_task_bounds_the_export_cache(var_dir, settings, checkpoint_storage):
    from training.tasks import sweep_blobs

    settings.AGORA_EXPORT_CACHE_KEEP, settings.AGORA_EXPORT_CACHE_MAX_AGE_H = 1, 24
    now = time.time()
    kept = _entry("m-v2-aa", 2 * HOUR, now)
    beyond = _entry("m-v1-bb", 3 * HOUR, now)
    assert sweep_blobs() == 1
    assert kept.exists() and not beyond.exists()
