"""The state an agent keeps between rounds: in memory for the next round, written to disk behind the work,
never leaving an older copy on disk than the one in memory."""

from __future__ import annotations

import threading

from workers.keep import StateKeeper


def _blocked(data: bytes, started: threading.Event, release: threading.Event, calls: list):
    def encode() -> bytes:
        calls.append(data)
        started.set()
        assert release.wait(20)
        return data
    return encode


def test_a_value_put_is_kept_in_memory_and_written_to_its_file(tmp_path):
    keeper = StateKeeper()
    a, b = tmp_path / "optim" / "1.safetensors", tmp_path / "optim" / "2.safetensors"
    keeper.put(a, {"x": 1}, lambda: b"state of run 1", run_id=1)
    assert keeper.get(a, 1) == {"x": 1}
    assert keeper.get(a, 2) is None  # another run's question is answered from its file, not this memory
    assert keeper.flush(30) and a.read_bytes() == b"state of run 1"
    assert a.stat().st_mode & 0o077 == 0  # private, like every file the agent writes

    keeper.put(b, {"x": 2}, lambda: b"state of run 2", run_id=2)
    assert keeper.get(b, 2) == {"x": 2} and keeper.get(a, 1) is None  # memory holds the latest run only
    assert keeper.flush(30) and a.read_bytes() == b"state of run 1" and b.read_bytes() == b"state of run 2"


def test_the_previous_file_goes_at_once_so_a_crash_never_leaves_an_older_state(tmp_path):
    keeper = StateKeeper()
    path = tmp_path / "ef.safetensors"
    path.write_bytes(b"round 1")
    started, release, calls = threading.Event(), threading.Event(), []
    keeper.put(path, "round 2", _blocked(b"round 2", started, release, calls), run_id=1)
    assert started.wait(20)
    assert not path.exists()  # while round 2's state is being written, no file rather than round 1's
    release.set()
    assert keeper.flush(30) and path.read_bytes() == b"round 2"


def test_a_newer_value_replaces_a_write_not_begun_and_waits_for_one_under_way(tmp_path):
    keeper = StateKeeper()
    first, second = tmp_path / "a", tmp_path / "b"
    started, release, calls = threading.Event(), threading.Event(), []
    keeper.put(first, 1, _blocked(b"a1", started, release, calls), run_id=1)
    assert started.wait(20)  # the writer is busy with a1
    keeper.put(second, 1, lambda: calls.append(b"b1") or b"b1", run_id=1)
    keeper.put(second, 2, lambda: calls.append(b"b2") or b"b2", run_id=1)  # b1 never began: replaced
    done = threading.Event()

    def put_a2():  # a1 is being written: a2 must wait for it, or a1 could land after a2's removal
        keeper.put(first, 2, lambda: calls.append(b"a2") or b"a2", run_id=1)
        done.set()

    threading.Thread(target=put_a2, daemon=True).start()
    assert not done.wait(0.3)
    release.set()
    assert done.wait(20) and keeper.flush(30)
    assert first.read_bytes() == b"a2" and second.read_bytes() == b"b2"
    assert b"b1" not in calls and calls[0] == b"a1"
    assert keeper.get(first, 1) == 2 and keeper.get(second, 1) == 2


def test_a_failed_write_is_logged_and_the_value_stays_in_memory(tmp_path, caplog):
    keeper = StateKeeper()
    path = tmp_path / "optim.safetensors"

    def encode() -> bytes:
        raise OSError("No space left on device")

    keeper.put(path, "state", encode, run_id=3)
    assert keeper.flush(30)
    assert not path.exists() and keeper.get(path, 3) == "state"
    assert "No space left on device" in caplog.text
    keeper.forget(path)
    assert keeper.get(path, 3) is None
