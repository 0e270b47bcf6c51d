"""Scoring a contribution: an update that trained on its own shard passes; noise, another shard's work and
a non-finite update do not; the verdict is deterministic."""

import math

import pytest
import torch

from diloco.data import encode_documents, load_documents, shard_documents, split_documents
from diloco.inner import InnerConfig, inner_train
from diloco.models import build_model, init_state
from diloco.scoring import Gains, judge, score_windows, update_gains, windows_loss

ARCH = "byte-gpt"


@pytest.fixture(scope="module")
def data():
    train, _ = split_documents(load_documents("builtin:python-docs"), 0.1)
    shards = [encode_documents(shard_documents(train, i, 3)) for i in range(3)]
    # Text of another kind altogether: what a worker assigned the docs never learns by training on them.
    other = torch.tensor(list(("".join(chr(65 + (i * 7) % 26) for i in range(4000))).encode()), dtype=torch.long)
    return shards, other


def _train(config, base, tokens, steps, seed):
    model = build_model(ARCH, config)
    model.load_state_dict(base)
    return inner_train(model, tokens, InnerConfig(steps=steps, lr=3e-3, batch_size=8, seq_len=32, warmup=1),
                       seed=seed).pseudo_gradient


def _norm(u):
    return math.sqrt(sum(float(v.float().norm()) ** 2 for v in u.values()))


def _noise_like(u, seed):
    gen = torch.Generator().manual_seed(seed)
    noise = {k: torch.randn(v.shape, generator=gen) for k, v in u.items()}
    scale = _norm(u) / _norm(noise)
    return {k: v * scale for k, v in noise.items()}


def _gains(config, base, update, own, other):
    return update_gains(arch=ARCH, config=config, base=base, update=update,
                        own=score_windows(own, count=16, seq_len=32, seed=5),
                        other=score_windows(other, count=16, seq_len=32, seed=6))


def test_honest_updates_pass_and_free_riders_fail(tiny_config, data):
    shards, other = data
    base = init_state(ARCH, tiny_config, seed=0)
    honest = [_train(tiny_config, base, shards[s], 3, seed=s) for s in range(3)]
    noise = _noise_like(honest[0], seed=9)
    wrong_data = _train(tiny_config, base, other, 3, seed=4)  # trained on data it was not assigned
    updates = [*honest, noise, wrong_data]
    own = [shards[0], shards[1], shards[2], shards[0], shards[1]]
    gains = [_gains(tiny_config, base, u, o, other) for u, o in zip(updates, own, strict=True)]
    scores = judge(gains)
    assert [s.passed for s in scores] == [True, True, True, False, False], [s.reason for s in scores]
    assert "own shard" in scores[3].reason or "median" in scores[3].reason
    assert scores[4].other_gain > scores[4].own_gain
    assert all(s.own_gain > 0 for s in scores[:3])
    # The JSON form is what the server stores: finite floats or None.
    js = scores[0].as_json()
    assert js["passed"] is True and js["score"] == pytest.approx(js["own_gain"] - js["other_gain"], abs=1e-5)


def test_scoring_is_deterministic_and_the_batched_pass_matches_separate_ones(tiny_config, data):
    shards, other = data
    base = init_state(ARCH, tiny_config, seed=1)
    update = _train(tiny_config, base, shards[1], 2, seed=3)
    a = _gains(tiny_config, base, update, shards[1], other)
    b = _gains(tiny_config, base, update, shards[1], other)
    assert a == b
    after = {k: base[k] - update[k] for k in base}
    own_w = score_windows(shards[1], count=16, seq_len=32, seed=5)
    assert a.own_after == pytest.approx(windows_loss(ARCH, tiny_config, after, own_w, batch_size=5), rel=1e-5)
    assert a.own_before == pytest.approx(windows_loss(ARCH, tiny_config, base, own_w), rel=1e-6)


def test_a_non_finite_or_unscored_update_fails_and_stays_json_safe():
    good = Gains(3.0, 2.5, 3.0, 2.8)
    scores = judge([good, Gains(3.0, float("nan"), 3.0, 2.9), None])
    assert [s.passed for s in scores] == [True, False, False]
    assert scores[1].as_json()["own_after"] is None and scores[1].as_json()["own_gain"] is None
    assert scores[2].reason == "not scored"


def test_a_minority_cannot_lower_the_bar_and_a_tiny_gain_fails():
    honest = [Gains(3.0, 2.6, 3.0, 2.7) for _ in range(5)]
    scores = judge([*honest, Gains(3.0, 2.99, 3.0, 2.995), Gains(3.0, 3.5, 3.0, 3.4)])
    assert [s.passed for s in scores] == [True] * 5 + [False, False]
    assert "median" in scores[5].reason and "does not lower" in scores[6].reason


def test_an_update_that_learns_other_data_better_than_its_own_shard_fails():
    scores = judge([Gains(3.0, 2.6, 3.0, 2.7), Gains(3.0, 2.6, 3.0, 2.7), Gains(3.0, 2.8, 3.0, 2.0)])
    assert [s.passed for s in scores] == [True, True, False]
    assert "learns other data" in scores[2].reason
    with pytest.raises(ValueError):
        judge([], tolerance=1.0)


def test_windows_need_enough_tokens():
    with pytest.raises(ValueError, match="seq_len"):
        score_windows(torch.zeros(10, dtype=torch.long), count=2, seq_len=32, seed=0)
    w = score_windows(torch.arange(1000), count=4, seq_len=8, seed=1)
    assert w.shape == (4, 9) and torch.equal(w[:, 1:] - w[:, :-1], torch.ones(4, 8, dtype=torch.long))
