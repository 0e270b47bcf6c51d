"""The task runner with the real diloco library: checkpoint cache, data per the contract, inner loop, codec."""

from __future__ import annotations

import math

import pytest
import torch

from tests.workers.conftest import make_task
from workers.client import Client
from workers.runner import TaskAborted, TaskError, TaskRunner


class Hooks:
    def __init__(self, abort_at: int | None = None):
        self.steps: list[tuple[int, int, float]] = []
        self.abort_at = abort_at

    def check(self) -> None:
        if self.abort_at is not None and len(self.steps) >= self.abort_at:
            raise TaskAborted("stop")

    def on_step(self, step: int, steps: int, loss: float) -> None:
        self.steps.append((step, steps, loss))
        self.check()


@pytest.fixture
def runner(fake_server, tiny_checkpoint, tmp_path):
    data, sha, _ = tiny_checkpoint
    fake_server.on("GET", f"/api/v1/checkpoints/{sha}", (200, data))
    client = Client(fake_server.url, "wkr_secret")
    yield TaskRunner(client=client, cache_dir=tmp_path / "cache")
    client.close()


def checkpoint_gets(fake_server, sha):
    return fake_server.calls("GET", f"/api/v1/checkpoints/{sha}")


def test_runner_trains_and_returns_a_decodable_update(runner, fake_server, tiny_checkpoint):
    from diloco.codecs import decode_update, reference_of

    _, sha, state = tiny_checkpoint
    hooks = Hooks()
    out = runner.run(make_task(checkpoint_sha256=sha, steps=3), hooks)
    delta = decode_update(out.update, reference_of(state))
    assert set(delta) == set(state)
    assert all(torch.isfinite(t).all() for t in delta.values())
    assert any(t.abs().sum() > 0 for t in delta.values())
    assert set(out.metrics) == {"loss_start", "loss_end", "steps", "tokens", "seconds", "tokens_per_s"}
    assert out.metrics["tokens_per_s"] > 0
    assert out.metrics["steps"] == 3 and out.metrics["tokens"] == 3 * 2 * 16
    assert math.isfinite(out.metrics["loss_start"]) and math.isfinite(out.metrics["loss_end"])
    assert [(s, n) for s, n, _ in hooks.steps] == [(1, 3), (2, 3), (3, 3)]
    assert runner.checkpoint_file(sha).exists()
    assert runner.keeper.flush(30) and runner.optimizer_file(4).exists()  # written behind the work
    assert checkpoint_gets(fake_server, sha)[0].headers["Authorization"] == "Bearer wkr_secret"


def test_update_matches_diloco_run_directly_on_the_contract_shard(runner, tiny_checkpoint):
    from diloco.checkpoint import load_weights
    from diloco.codecs import decode_update, encode_update, reference_of
    from diloco.data import encode_documents, load_documents, shard_documents, split_documents
    from diloco.guardrails import filter_documents
    from diloco.inner import InnerConfig, inner_train
    from diloco.models import build_model

    data, sha, state = tiny_checkpoint
    guardrail = {"id": 1, "title": "no lambdas", "kind": "data_filter", "patterns": [r"\blambda\b"],
                 "description": ""}
    task = make_task(checkpoint_sha256=sha, steps=3, guardrails=[guardrail], compression="fp32")
    task["dataset"]["shard_index"] = 1

    kept, dropped = filter_documents(split_documents(load_documents("builtin:python-docs"), 0.1)[0], [guardrail])
    tokens = encode_documents(shard_documents(kept, 1, 2))
    assert dropped > 0
    got_tokens, info = runner.load_tokens(task)
    assert torch.equal(got_tokens, tokens) and info["dropped_by_guardrails"] == dropped

    model = build_model(task["model"]["arch"], task["model"]["config"])
    model.load_state_dict(load_weights(data)[0])
    expected = inner_train(model, tokens, InnerConfig(**task["inner"]), seed=task["seed"])
    out = runner.run(task, Hooks())
    assert out.update == encode_update(expected.pseudo_gradient, "fp32")
    assert decode_update(out.update, reference_of(state)).keys() == state.keys()


def test_checkpoint_is_cached_and_optimizer_state_reused(runner, fake_server, tiny_checkpoint, monkeypatch):
    import diloco.inner

    _, sha, _ = tiny_checkpoint
    seen = []
    real = diloco.inner.inner_train

    def spy(*args, optimizer_state=None, **kwargs):
        seen.append(optimizer_state)
        return real(*args, optimizer_state=optimizer_state, **kwargs)

    monkeypatch.setattr(diloco.inner, "inner_train", spy)
    runner.run(make_task(checkpoint_sha256=sha), Hooks())
    runner.run(make_task(18, checkpoint_sha256=sha, round=2), Hooks())
    assert len(checkpoint_gets(fake_server, sha)) == 1
    assert seen[0] is None
    assert seen[1] and all(k.endswith((".exp_avg", ".exp_avg_sq", ".step")) for k in seen[1])
    # another run does not get this run's optimizer state
    runner.run(make_task(19, checkpoint_sha256=sha, run_id=99), Hooks())
    assert seen[2] is None


def test_corrupt_cache_entries_are_downloaded_again(runner, fake_server, tiny_checkpoint):
    _, sha, _ = tiny_checkpoint
    path = runner.checkpoint_file(sha)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not the checkpoint")
    runner.run(make_task(checkpoint_sha256=sha), Hooks())
    assert len(checkpoint_gets(fake_server, sha)) == 1
    assert runner.keeper.flush(30)
    runner.optimizer_file(4).write_bytes(b"garbage")  # a damaged optimizer state is discarded, not fatal
    restarted = TaskRunner(client=runner.client, cache_dir=runner.cache_dir)  # reads the file, not memory
    restarted.run(make_task(checkpoint_sha256=sha), Hooks())


def test_checkpoint_with_the_wrong_hash_is_refused(runner, fake_server, tiny_checkpoint):
    data, _, _ = tiny_checkpoint
    wrong = "c" * 64
    fake_server.on("GET", f"/api/v1/checkpoints/{wrong}", (200, data))
    with pytest.raises(TaskError, match="sha256"):
        runner.run(make_task(checkpoint_sha256=wrong), Hooks())
    assert not runner.checkpoint_file(wrong).exists()


def test_guardrails_that_drop_everything_leave_nothing_to_train_on(runner, tiny_checkpoint):
    _, sha, _ = tiny_checkpoint
    everything = {"id": 2, "title": "all", "kind": "data_filter", "patterns": ["."], "description": ""}
    output_only = {"id": 3, "title": "out", "kind": "output_filter", "patterns": ["."], "description": ""}
    with pytest.raises(TaskError, match="data shard has 0 tokens"):
        runner.run(make_task(checkpoint_sha256=sha, guardrails=[everything]), Hooks())
    runner.run(make_task(checkpoint_sha256=sha, guardrails=[output_only]), Hooks())  # not a data filter


def test_update_over_the_upload_limit_is_an_error(runner, tiny_checkpoint):
    _, sha, _ = tiny_checkpoint
    with pytest.raises(TaskError, match="over the task's limit"):
        runner.run(make_task(checkpoint_sha256=sha, max_upload_bytes=100), Hooks())


def test_checkpoint_that_does_not_fit_the_model_is_an_error(runner, tiny_checkpoint):
    _, sha, _ = tiny_checkpoint
    task = make_task(checkpoint_sha256=sha)
    task["model"] = {"arch": "byte-gpt", "config": {"n_layer": 2, "n_embd": 16, "n_head": 2, "block_size": 16}}
    with pytest.raises(TaskError, match="does not fit"):
        runner.run(task, Hooks())


def test_abort_stops_training_and_keeps_no_optimizer_state(runner, tiny_checkpoint):
    _, sha, _ = tiny_checkpoint
    hooks = Hooks(abort_at=2)
    with pytest.raises(TaskAborted):
        runner.run(make_task(checkpoint_sha256=sha, steps=50), hooks)
    assert len(hooks.steps) == 2
    assert not runner.optimizer_file(4).exists()


@pytest.mark.parametrize("broken", [{"inner": {"steps": 0, "lr": 0.1, "batch_size": 1, "seq_len": 8}},
                                    {"compression": "int3"}])
def test_malformed_tasks_are_errors(runner, tiny_checkpoint, broken):
    _, sha, _ = tiny_checkpoint
    task = make_task(checkpoint_sha256=sha)
    task.update(broken)
    with pytest.raises(TaskError):
        runner.run(task, Hooks())
    task = make_task(checkpoint_sha256=sha)
    del task["dataset"]
    with pytest.raises(TaskError, match="no dataset"):
        runner.run(task, Hooks())
