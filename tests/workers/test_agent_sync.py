"""The agent between rounds: it rebuilds a checkpoint from the published step when it holds the previous one,
downloads the checkpoint on a gap or a mismatch, and keeps its error-feedback buffer for sparse codecs."""

from __future__ import annotations

import pytest
import torch

from diloco.checkpoint import save_weights, sha256_hex
from diloco.codecs import decode_update, encode_update, reference_of
from diloco.outer import published_delta
from diloco.sparse import encode_published_delta
from tests.workers.conftest import TINY_MODEL, make_task
from workers import sync
from workers.client import Client
from workers.runner import TaskRunner


def _sparse_step(state, seed=0):
    g = torch.Generator().manual_seed(seed)
    step = {}
    for name, t in state.items():
        d = torch.zeros_like(t).reshape(-1)
        idx = torch.randperm(d.numel(), generator=g)[: max(1, d.numel() // 50)]
        d[idx] = torch.randn(idx.numel(), generator=g) * 0.01
        step[name] = d.view_as(t)
    return published_delta(step)


@pytest.fixture
def chain(tiny_checkpoint):
    """Checkpoint A, the published step to B, and B (bytes and sha256s)."""
    a_bytes, a_sha, state = tiny_checkpoint
    d = _sparse_step(state)
    meta = {"arch": TINY_MODEL["arch"], "config": TINY_MODEL["config"], "run_id": 4, "round": 1}
    b_bytes = save_weights({k: state[k] - d[k] for k in state}, meta)
    b_sha = sha256_hex(b_bytes)
    step = encode_published_delta(d, meta={"from": a_sha, "to": b_sha, "checkpoint_meta": meta})
    return {"a": a_bytes, "a_sha": a_sha, "b": b_bytes, "b_sha": b_sha, "step": step, "step_sha": sha256_hex(step)}


@pytest.fixture
def runner(fake_server, tmp_path):
    client = Client(fake_server.url, "wkr_secret")
    yield TaskRunner(client=client, cache_dir=tmp_path / "cache")
    client.close()


def _task(chain, **overrides):
    return make_task(**{"checkpoint_sha256": chain["b_sha"], "delta_from_sha256": chain["a_sha"],
                        "delta_sha256": chain["step_sha"], **overrides})


def _serve(fake_server, chain, step=None):
    fake_server.on("GET", f"/api/v1/checkpoints/{chain['b_sha']}", (200, chain["b"]))
    fake_server.on("GET", f"/api/v1/checkpoints/{chain['b_sha']}/delta", (200, step or chain["step"]))


def _gets(fake_server, path):
    return fake_server.calls("GET", path)


def test_an_agent_holding_the_previous_checkpoint_downloads_only_the_step(fake_server, runner, chain):
    _serve(fake_server, chain)
    runner.checkpoint_file(chain["a_sha"]).parent.mkdir(parents=True)
    runner.checkpoint_file(chain["a_sha"]).write_bytes(chain["a"])

    data = runner.fetch_checkpoint(chain["b_sha"], task=_task(chain))

    assert data == chain["b"] and runner.checkpoint_via == "delta"
    assert not _gets(fake_server, f"/api/v1/checkpoints/{chain['b_sha']}")  # the checkpoint never travelled
    assert len(_gets(fake_server, f"/api/v1/checkpoints/{chain['b_sha']}/delta")) == 1
    assert runner.checkpoint_file(chain["b_sha"]).read_bytes() == chain["b"]  # cached for the next round
    assert len(chain["step"]) < len(chain["b"]) / 5
    # The next time it comes from the cache.
    assert runner.fetch_checkpoint(chain["b_sha"], task=_task(chain)) == chain["b"]
    assert runner.checkpoint_via == "cache"


def test_an_agent_that_missed_a_round_downloads_the_checkpoint(fake_server, runner, chain):
    _serve(fake_server, chain)
    data = runner.fetch_checkpoint(chain["b_sha"], task=_task(chain))
    assert data == chain["b"] and runner.checkpoint_via == "full"
    assert not _gets(fake_server, f"/api/v1/checkpoints/{chain['b_sha']}/delta")
    assert len(_gets(fake_server, f"/api/v1/checkpoints/{chain['b_sha']}")) == 1


@pytest.mark.parametrize("spoil", ["bytes", "meta", "missing"])
def test_a_step_that_does_not_rebuild_the_checkpoint_falls_back_to_it(fake_server, runner, chain, spoil,
                                                                       tiny_checkpoint):
    _, a_sha, state = tiny_checkpoint
    if spoil == "bytes":  # not the step the task names
        step = encode_published_delta(_sparse_step(state, seed=1), meta=published_meta_of(chain["step"]))
        task = _task(chain)
    elif spoil == "meta":  # the named step, but it rebuilds other bytes (other metadata)
        meta = {**published_meta_of(chain["step"]), "checkpoint_meta": {"arch": "byte-gpt"}}
        step = encode_published_delta(_sparse_step(state), meta=meta)
        task = _task(chain, delta_sha256=sha256_hex(step))
    else:
        step, task = None, _task(chain)
    _serve(fake_server, chain, step)
    if spoil == "missing":
        fake_server.on("GET", f"/api/v1/checkpoints/{chain['b_sha']}/delta", (404, {"error": "not_found"}))
    runner.checkpoint_file(a_sha).parent.mkdir(parents=True)
    runner.checkpoint_file(a_sha).write_bytes(chain["a"])

    assert runner.fetch_checkpoint(chain["b_sha"], task=task) == chain["b"]
    assert runner.checkpoint_via == "full"
    assert len(_gets(fake_server, f"/api/v1/checkpoints/{chain['b_sha']}")) == 1


def published_meta_of(step: bytes) -> dict:
    from diloco.sparse import published_meta

    return published_meta(step)


def test_the_cache_keeps_only_the_newest_checkpoints(tmp_path):
    import os

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for i in range(7):
        p = folder / f"{i:064x}.safetensors"
        p.write_bytes(b"x")
        os.utime(p, (1000 + i, 1000 + i))
    sync.prune_checkpoints(folder, keep=3)
    assert sorted(p.name[-13:-12] for p in folder.iterdir()) == ["4", "5", "6"]


def test_sparse_updates_carry_what_earlier_rounds_left_out(runner, tiny_checkpoint):
    _, _, state = tiny_checkpoint
    task = make_task(compression="topk2", run_id=9)
    g = torch.Generator().manual_seed(3)
    first = {k: torch.randn(v.shape, generator=g) for k, v in state.items()}
    second = {k: torch.randn(v.shape, generator=g) for k, v in state.items()}

    sync.encode_pseudo_gradient(runner, task, first)
    path = sync.error_feedback_file(runner, 9)
    assert runner.keeper.flush(30) and path.exists()  # written beside the optimizer state, for a restart
    sent = decode_update(sync.encode_pseudo_gradient(runner, task, second), reference_of(state))
    alone = decode_update(encode_update(second, "topk2"), reference_of(state))
    assert any(not torch.equal(sent[k], alone[k]) for k in state)  # the buffer's leftovers went along

    # A dense codec uses no buffer; another run has its own.
    dense = sync.encode_pseudo_gradient(runner, make_task(compression="int8", run_id=10), first)
    assert dense == encode_update(first, "int8") and not sync.error_feedback_file(runner, 10).exists()


def test_the_buffer_on_disk_is_what_a_restarted_agent_carries_on_with(runner, tiny_checkpoint):
    """In memory between rounds, on disk for a restart: a new runner (a restarted agent) reading the file
    sends exactly what the same runner would have sent."""
    from workers.runner import TaskRunner

    _, _, state = tiny_checkpoint
    task = make_task(compression="topk2", run_id=9)
    g = torch.Generator().manual_seed(5)
    first, second = ({k: torch.randn(v.shape, generator=g) for k, v in state.items()} for _ in range(2))
    sync.encode_pseudo_gradient(runner, task, first)
    assert runner.keeper.flush(30)
    restarted = TaskRunner(client=runner.client, cache_dir=runner.cache_dir)
    assert sync.encode_pseudo_gradient(restarted, task, second) == sync.encode_pseudo_gradient(runner, task, second)


def test_a_damaged_error_feedback_buffer_is_dropped_not_fatal(runner, tiny_checkpoint):
    _, _, state = tiny_checkpoint
    path = sync.error_feedback_file(runner, 9)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage")
    delta = {k: torch.ones_like(v) for k, v in state.items()}
    data = sync.encode_pseudo_gradient(runner, make_task(compression="topk2", run_id=9), delta)
    assert decode_update(data, reference_of(state)).keys() == state.keys()
    assert runner.keeper.flush(30) and path.read_bytes() != b"garbage"  # replaced by this round's buffer


def _update_chunk(data: bytes) -> int:
    """The chunk an encoded update names in its metadata."""
    import json

    from diloco.codecs import META_KEY

    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    return json.loads(header["__metadata__"][META_KEY])["chunk"]


def test_a_sparse_update_is_cut_into_the_tasks_chunk_and_the_buffer_carries_over(runner, tiny_checkpoint):
    _, _, state = tiny_checkpoint
    g = torch.Generator().manual_seed(4)
    first = {k: torch.randn(v.shape, generator=g) for k, v in state.items()}
    second = {k: torch.randn(v.shape, generator=g) for k, v in state.items()}
    data = sync.encode_pseudo_gradient(runner, make_task(compression="topk2", run_id=9, sparse_chunk=1024), first)
    assert _update_chunk(data) == 1024
    # The run's next task asks for another chunk: the (dense) buffer is kept and cut the new way.
    data = sync.encode_pseudo_gradient(runner, make_task(compression="topk2", run_id=9, sparse_chunk=32768), second)
    assert _update_chunk(data) == 32768
    sent = decode_update(data, reference_of(state))
    alone = decode_update(encode_update(second, "topk2", chunk=32768), reference_of(state))
    assert any(not torch.equal(sent[k], alone[k]) for k in state)  # the first round's leftovers went along


@pytest.mark.parametrize("chunk", [5000, 65536, 32, 0, -4096, True, 4096.0, "32768", [1024], {"chunk": 1024}])
def test_a_sparse_chunk_no_decoder_takes_falls_back_to_4096_with_a_warning(runner, tiny_checkpoint, caplog, chunk):
    _, _, state = tiny_checkpoint
    delta = {k: torch.ones_like(v) for k, v in state.items()}
    with caplog.at_level("WARNING", logger="agora.worker.sync"):
        data = sync.encode_pseudo_gradient(runner, make_task(compression="topk2", run_id=9, sparse_chunk=chunk), delta)
    assert _update_chunk(data) == 4096
    assert decode_update(data, reference_of(state)).keys() == state.keys()
    assert any("sparse_chunk" in r.getMessage() for r in caplog.records)


def test_a_task_without_sparse_chunk_uses_4096_quietly(runner, tiny_checkpoint, caplog):
    _, _, state = tiny_checkpoint
    delta = {k: torch.ones_like(v) for k, v in state.items()}
    with caplog.at_level("WARNING", logger="agora.worker.sync"):
        data = sync.encode_pseudo_gradient(runner, make_task(compression="topk2", run_id=9), delta)
    assert _update_chunk(data) == 4096  # a server from before the setting
    assert not caplog.records
