"""Overlap: the agent trains ahead while its result travels, then moves those steps onto the next round's
checkpoint; its update is still measured from the task's checkpoint."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from diloco.checkpoint import save_weights, sha256_hex
from diloco.data import encode_documents, load_documents
from diloco.inner import InnerConfig
from diloco.models import build_model, init_state
from tests.workers.conftest import TINY_MODEL, make_task
from workers.overlap import AheadTrainer, inner_train_with_head_start

CFG = InnerConfig(steps=4, lr=1e-3, batch_size=2, seq_len=16, warmup=0)


@pytest.fixture(scope="module")
def tokens():
    return encode_documents(load_documents("builtin:python-docs", None)[:20])


def _model(seed):
    model = build_model(TINY_MODEL["arch"], dict(TINY_MODEL["config"]))
    model.load_state_dict(init_state(TINY_MODEL["arch"], TINY_MODEL["config"], seed=seed))
    return model


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _round(runner, task, tokens, seed):
    model = _model(seed)
    start = _state(model)
    result = inner_train_with_head_start(runner, task, model, tokens, CFG, seed=task["seed"], device="cpu",
                                         optimizer_state=None)
    return start, model, result


def _ahead(runner):
    trainer = runner.ahead
    assert isinstance(trainer, AheadTrainer)
    trainer.join()  # let it train all its steps; the next task takes them as its head start
    return trainer


def _runner(max_steps=None):
    return SimpleNamespace(train_ahead=True, ahead_max_steps=max_steps)


def test_the_steps_trained_ahead_become_part_of_the_next_rounds_update(tokens):
    runner = _runner(max_steps=2)
    _round(runner, make_task(1, overlap=True, round=1, run_id=4), tokens, seed=1)
    assert runner.ahead is not None and runner.ahead.ctx.round == 1  # training ahead as soon as round 1 ends
    ahead = _ahead(runner)
    assert ahead.steps == 2

    # Round 2's checkpoint: other weights (the server's aggregate); the head start is moved onto them.
    runner.train_ahead = False  # nothing trains round 2's model ahead while the test reads it
    start, model, result = _round(runner, make_task(2, overlap=True, round=2, run_id=4), tokens, seed=2)
    assert runner.overlap_info["overlap_steps"] == 2 and runner.overlap_info["overlap_from_round"] == 1
    assert result.steps == CFG.steps  # two ahead, two after the task arrived
    assert runner.overlap_info["compute_seconds"] == pytest.approx(result.seconds)
    assert result.seconds >= ahead.seconds
    # The update is measured from the task's checkpoint: θ_task − Δ is where training ended.
    end = _state(model)
    for k in start:
        torch.testing.assert_close(start[k] - result.pseudo_gradient[k], end[k], rtol=0, atol=1e-6)


def test_a_head_start_that_covers_every_step_is_the_whole_update(tokens):
    runner = _runner()
    _round(runner, make_task(1, overlap=True, round=1, run_id=4), tokens, seed=1)
    ahead = _ahead(runner)  # all H steps trained ahead: the upload can leave as soon as the task arrives
    assert ahead.steps == CFG.steps
    delta = {k: v.clone() for k, v in ahead.finish().delta.items()}
    runner.train_ahead = False  # nothing trains round 2's model ahead while the test reads it
    start, model, result = _round(runner, make_task(2, overlap=True, round=2, run_id=4), tokens, seed=2)
    assert runner.overlap_info["overlap_steps"] == CFG.steps
    assert all(torch.equal(result.pseudo_gradient[k], delta[k]) for k in delta)
    assert all(torch.equal(_state(model)[k], start[k] - delta[k]) for k in delta)


@pytest.mark.parametrize("task", [
    make_task(2, overlap=True, round=3, run_id=4),   # a gap: it missed round 2
    make_task(2, overlap=True, round=2, run_id=5),   # another run
    make_task(2, overlap=False, round=2, run_id=4),  # the run does not overlap
])
def test_a_head_start_is_used_only_for_the_same_runs_next_round(tokens, task):
    runner = _runner(max_steps=1)
    _round(runner, make_task(1, overlap=True, round=1, run_id=4), tokens, seed=1)
    _ahead(runner)
    start, model, result = _round(runner, task, tokens, seed=2)
    assert "overlap_steps" not in runner.overlap_info
    assert result.steps == CFG.steps


def test_no_overlap_no_training_ahead(tokens):
    runner = _runner()
    _round(runner, make_task(1, round=1, run_id=4), tokens, seed=1)
    assert runner.ahead is None
    runner = SimpleNamespace(train_ahead=False)  # --once, --finish, --idle-only
    _round(runner, make_task(1, overlap=True, round=1, run_id=4), tokens, seed=1)
    assert runner.ahead is None


def test_an_overlapping_agent_reports_its_head_start_against_a_server(fake_server, worker_config, tmp_path):
    """Two rounds through the real agent and runner: the second update says how many of its steps were
    trained ahead, and that it is measured from round 2's checkpoint."""
    import threading

    from workers.agent import Agent, AgentOptions
    from workers.client import Client
    from workers.runner import TaskRunner

    state = init_state(TINY_MODEL["arch"], TINY_MODEL["config"], seed=1)
    c1 = save_weights(state, {"arch": TINY_MODEL["arch"], "config": TINY_MODEL["config"]})
    c2 = save_weights({k: v * 0.99 for k, v in state.items()}, {"arch": TINY_MODEL["arch"], "round": 1})
    sha1, sha2 = sha256_hex(c1), sha256_hex(c2)
    fake_server.on("GET", f"/api/v1/checkpoints/{sha1}", (200, c1))
    fake_server.on("GET", f"/api/v1/checkpoints/{sha2}", (200, c2))
    t1 = make_task(11, round=1, checkpoint_sha256=sha1, checkpoint_url=None, overlap=True, steps=8)
    t2 = make_task(12, round=2, checkpoint_sha256=sha2, checkpoint_url=None, overlap=True, steps=8)
    delivered = threading.Event()
    queue = [t1]

    def claim(_req):  # round 2 opens only once round 1's result is in (and is then handed out once)
        if queue and queue[0] is not None:
            return 200, queue.pop(0)
        if delivered.is_set() and not queue:
            queue.append(None)
            return 200, t2
        return 204, None

    def result_11(_req):
        delivered.set()
        return 202, {"accepted_for_aggregation": True}

    fake_server.on("POST", "/api/v1/tasks/claim", claim)
    fake_server.on("POST", "/api/v1/tasks/11/result", result_11)
    fake_server.on("POST", "/api/v1/tasks/12/result", (202, {"accepted_for_aggregation": True}))
    client = Client(fake_server.url, "wkr_secret")
    runner = TaskRunner(client=client, cache_dir=tmp_path / "cache")
    agent = Agent(worker_config, runner=runner, client=client, options=AgentOptions(min_poll_s=0.05))
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        rec = fake_server.wait_for(lambda: fake_server.calls("POST", "/api/v1/tasks/12/result"), timeout=60,
                                   what="round 2's result")[0]
    finally:
        agent.request_stop()
        thread.join(timeout=30)
    first = json.loads(fake_server.calls("POST", "/api/v1/tasks/11/result")[0].form["metrics"])
    second = json.loads(rec.form["metrics"])
    assert "overlap_steps" not in first and first["base_checkpoint_sha256"] == sha1
    assert second["base_checkpoint_sha256"] == sha2 and second["overlap_from_round"] == 1
    assert 1 <= second["overlap_steps"] <= 8 and second["steps"] == 8
    assert second["compute_seconds"] <= second["wall_seconds"]
