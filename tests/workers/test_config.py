import os
import stat

import pytest

from workers import config as cfgmod


@pytest.fixture
def permissive_umask():
    old = os.umask(0)
    yield
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_config_is_created_0600_and_round_trips(tmp_path, permissive_umask):
    path = tmp_path / "conf" / "worker.json"
    config = cfgmod.WorkerConfig(server="https://agora.example", worker_id=3, worker_token="wkr_x", name="box",
                                 path=path)
    cfgmod.save_config(config)
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    loaded = cfgmod.load_config(path)
    assert (loaded.server, loaded.worker_id, loaded.worker_token, loaded.name) == (
        "https://agora.example", 3, "wkr_x", "box")
    assert "wkr_x" not in repr(loaded)


def test_replacing_a_world_readable_file_makes_it_private_atomically(tmp_path, permissive_umask):
    path = tmp_path / "worker.json"
    path.write_text("{}")
    os.chmod(path, 0o644)
    cfgmod.write_json(path, {"server": "http://s", "worker_id": 1, "worker_token": "t"})
    assert _mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["worker.json"]  # no temporary files left behind
    assert cfgmod.config_is_private(path)


def test_missing_or_broken_config_says_what_to_do(tmp_path):
    with pytest.raises(cfgmod.ConfigError, match="agora-worker enroll"):
        cfgmod.load_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(cfgmod.ConfigError, match="not valid JSON"):
        cfgmod.load_config(bad)
    bad.write_text('{"server": "http://s"}')
    with pytest.raises(cfgmod.ConfigError, match="worker_id, worker_token"):
        cfgmod.load_config(bad)


def test_config_path_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(cfgmod.CONFIG_ENV, str(tmp_path / "x.json"))
    assert cfgmod.resolve_config_path(None) == tmp_path / "x.json"
    assert cfgmod.resolve_config_path(str(tmp_path / "y.json")) == tmp_path / "y.json"
    monkeypatch.delenv(cfgmod.CONFIG_ENV)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert cfgmod.resolve_config_path(None) == tmp_path / "xdg" / "agora" / "worker.json"


def test_cache_dir_defaults_next_to_the_config(tmp_path, monkeypatch):
    monkeypatch.delenv(cfgmod.CACHE_ENV, raising=False)
    config = cfgmod.WorkerConfig(server="s", worker_id=1, worker_token="t", path=tmp_path / "worker.json")
    assert config.cache_path == tmp_path / "cache"
    monkeypatch.setenv(cfgmod.CACHE_ENV, str(tmp_path / "elsewhere"))
    assert config.cache_path == tmp_path / "elsewhere"


def test_pause_file_and_task_state(tmp_path):
    path = tmp_path / "worker.json"
    assert not cfgmod.is_paused(path)
    assert cfgmod.set_paused(path, True) is False
    assert cfgmod.is_paused(path) and cfgmod.pause_path(path).exists()
    assert cfgmod.set_paused(path, True) is True
    assert cfgmod.set_paused(path, False) is True
    assert not cfgmod.is_paused(path)

    assert cfgmod.state_load(path) == {}
    cfgmod.state_save(path, {"task_id": 5})
    assert cfgmod.state_load(path) == {"task_id": 5}
    cfgmod.state_path(path).write_text("garbage")
    assert cfgmod.state_load(path) == {}
    cfgmod.state_clear(path)
    cfgmod.state_clear(path)
    assert not cfgmod.state_path(path).exists()


def test_pending_result_round_trips_privately_and_a_damaged_one_is_refused(tmp_path, permissive_umask):
    path = tmp_path / "worker.json"
    assert cfgmod.pending_load(path) is None and cfgmod.pending_manifest(path) is None
    metrics = {"loss_start": 5.5, "loss_end": 5.0, "steps": 4, "tokens": 128, "seconds": 0.1}
    cfgmod.pending_save(path, cfgmod.PendingResult(task_id=17, deadline="2030-01-01T00:00:00+00:00", metrics=metrics,
                                                   update=b"\x00UPDATE", run_id=4, round=2, clock_offset_s=-3.5))
    assert _mode(cfgmod.pending_manifest_path(path)) == 0o600 and _mode(cfgmod.pending_update_path(path)) == 0o600
    loaded = cfgmod.pending_load(path)
    assert (loaded.task_id, loaded.deadline, loaded.metrics, loaded.update, loaded.run_id, loaded.round,
            loaded.clock_offset_s) == (17, "2030-01-01T00:00:00+00:00", metrics, b"\x00UPDATE", 4, 2, -3.5)
    assert cfgmod.pending_manifest(path)["update_bytes"] == 7

    cfgmod.pending_update_path(path).write_bytes(b"\x00UPDATE"[:4])  # a torn update file
    with pytest.raises(cfgmod.PendingCorrupt, match="sha256"):
        cfgmod.pending_load(path)
    cfgmod.pending_update_path(path).unlink()
    with pytest.raises(cfgmod.PendingCorrupt, match="missing"):
        cfgmod.pending_load(path)
    cfgmod.pending_manifest_path(path).write_text('{"task_id": "17"}')
    with pytest.raises(cfgmod.PendingCorrupt):
        cfgmod.pending_load(path)
    cfgmod.pending_clear(path)
    cfgmod.pending_clear(path)
    assert cfgmod.pending_load(path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_agent_lock_is_exclusive_names_its_holder_and_dies_with_it(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "conf" / "worker.json"
    assert cfgmod.lock_holder(path) is None
    with cfgmod.AgentLock(path) as lock:
        assert lock.held and cfgmod.lock_holder(path) == os.getpid()
        with pytest.raises(cfgmod.AgentLocked, match=f"pid {os.getpid()}"):
            cfgmod.AgentLock(path).acquire()
    assert cfgmod.lock_holder(path) is None
    with cfgmod.AgentLock(path) as again:
        assert again.held

    other = tmp_path / "other" / "worker.json"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from workers.config import AgentLock; "
         f"AgentLock(Path({str(other)!r})).acquire(); print('locked', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert cfgmod.lock_holder(other) == holder.pid
        with pytest.raises(cfgmod.AgentLocked):
            cfgmod.AgentLock(other).acquire()
        holder.send_signal(signal.SIGKILL)  # no chance to clean up
        holder.wait(10)
        deadline = time.monotonic() + 10
        while cfgmod.lock_holder(other) is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cfgmod.lock_holder(other) is None
        with cfgmod.AgentLock(other) as mine:
            assert mine.held
    finally:
        holder.kill()
        holder.wait(10)
