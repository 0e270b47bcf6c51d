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
