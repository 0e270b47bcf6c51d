"""The outer round end to end on a tiny model: honest workers, and attackers who read the rules."""

import math

import pytest
import torch

from diloco.data import encode_documents, load_documents, shard_documents, split_documents
from diloco.evaluate import evaluate_loss
from diloco.inner import InnerConfig, inner_train
from diloco.models import build_model, init_state
from diloco.outer import OuterOptimizer
from diloco.round import AggregatorSpec, Update, outer_round

TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 32}
HONEST = 6


@pytest.fixture(scope="module")
def world():
    """A base state, six honest updates trained on six disjoint shards, and a held-out evaluator."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    train, heldout = split_documents(load_documents("builtin:python-docs"), 0.1)
    tokens = encode_documents(heldout)
    base = init_state("byte-gpt", TINY, seed=0)
    cfg = InnerConfig(steps=10, lr=3e-3, batch_size=8, seq_len=32, warmup=2)
    honest = []
    for w in range(HONEST):
        model = build_model("byte-gpt", TINY)
        model.load_state_dict(base)
        honest.append(inner_train(model, encode_documents(shard_documents(train, w, HONEST)), cfg, seed=w)
                      .pseudo_gradient)

    def evaluate(state):
        model = build_model("byte-gpt", TINY)
        model.load_state_dict(state)
        return evaluate_loss(model, tokens, batch_size=8, seq_len=32, batches=4)

    yield base, honest, evaluate
    torch.set_num_threads(previous)


def _norm(u):
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in u.values()))


def _mean(updates):
    return {k: sum(u[k] for u in updates) / len(updates) for k in updates[0]}


def _run(base, updates, evaluate, **kwargs):
    return outer_round(base_state=base, updates=[Update(f"u{i}", u) for i, u in enumerate(updates)],
                       evaluate=evaluate, **kwargs)


def _codes(result):
    return [v.code for v in result.verdicts]


def test_honest_round_accepts_everyone_and_lowers_the_heldout_loss(world):
    base, honest, evaluate = world
    result = _run(base, honest, evaluate)
    assert _codes(result) == ["accepted"] * HONEST
    assert result.accepted and result.reason == ""
    assert result.eval_after < result.eval_before
    assert [v.id for v in result.credited()] == [f"u{i}" for i in range(HONEST)] and result.blamed() == []
    assert all(0 < v.cosine <= 1 and v.norm > 0 and v.score is None for v in result.verdicts)
    # The step is exactly the outer optimizer applied to the trimmed mean of the updates.
    from diloco.aggregate import aggregate

    expected = OuterOptimizer(base).step(aggregate(honest, "trimmed_mean", trim_fraction=0.25))
    assert all(torch.equal(result.new_state[k], expected[k]) for k in expected)
    assert all(torch.equal(base[k], init_state("byte-gpt", TINY, seed=0)[k]) for k in base)  # untouched


def test_scaled_and_nan_updates_are_rejected_and_blamed(world):
    base, honest, evaluate = world
    scaled = {k: v * 20 for k, v in honest[0].items()}
    nan = {k: v.clone() for k, v in honest[1].items()}
    next(iter(nan.values())).view(-1)[7] = float("nan")
    result = _run(base, [*honest[:4], scaled, nan], evaluate)
    assert _codes(result) == ["accepted"] * 4 + ["norm_high", "non_finite"]
    assert result.verdicts[5].norm is None and "non-finite" in result.verdicts[5].reason
    assert result.accepted and result.eval_after < result.eval_before
    assert [v.id for v in result.blamed()] == ["u4", "u5"]
    assert [v.id for v in result.credited()] == ["u0", "u1", "u2", "u3"]


def test_colluders_sending_the_same_opposite_update_are_rejected_and_honest_ones_kept(world):
    """Two colluders upload one vector opposite to the honest mean, at three times the honest norm
    (under the 5x norm limit): each is judged against the others' coordinate median, which the pair
    cannot move, so neither vouches for the other."""
    base, honest, evaluate = world
    mean = _mean(honest)
    scale = 3 * _norm(honest[0]) / _norm(mean)
    attack = {k: -scale * v for k, v in mean.items()}
    result = _run(base, [*honest, attack, {k: v.clone() for k, v in attack.items()}], evaluate,
                  aggregator=AggregatorSpec("trimmed_mean", 0.25))
    assert _codes(result) == ["accepted"] * HONEST + ["direction", "direction"]
    assert all(v.cosine < 0 for v in result.verdicts[HONEST:])
    assert result.accepted and result.eval_after < result.eval_before
    assert {v.id for v in result.blamed()} == {"u6", "u7"}


def test_noise_at_the_median_norm_is_rejected_where_honest_updates_agree(world):
    base, honest, evaluate = world
    g = torch.Generator().manual_seed(5)
    noise = {k: torch.randn(v.shape, generator=g) for k, v in honest[0].items()}
    noise = {k: v * _norm(honest[0]) / _norm(noise) for k, v in noise.items()}
    result = _run(base, [*honest[:5], noise], evaluate)
    assert _codes(result) == ["accepted"] * 5 + ["direction"]
    assert abs(result.verdicts[5].cosine) < 0.1 < min(v.cosine for v in result.verdicts[:5])


def test_honest_updates_rejected_by_a_poisoned_majority_are_not_blamed_when_the_step_fails(world):
    """Four colluders outvote two honest workers: the screening, steered, turns the honest ones away,
    the evaluation gate then refuses the step, and nobody judged by that round loses reliability."""
    base, honest, evaluate = world
    mean = _mean(honest)
    attack = {k: -40 * v for k, v in mean.items()}
    result = _run(base, [honest[0], honest[1], *[{k: v.clone() for k, v in attack.items()} for _ in range(4)]],
                  evaluate)
    assert set(_codes(result)[:2]) <= {"direction", "norm_low"} and _codes(result)[2:] == ["accepted"] * 4
    assert not result.accepted and "held-out loss rose" in result.reason
    assert result.new_state is None and result.optimizer is None
    assert result.blamed() == [] and result.credited() == []


def test_an_unreadable_update_is_rejected_without_blame(world):
    base, honest, evaluate = world
    result = outer_round(base_state=base, evaluate=evaluate,
                         updates=[*(Update(i, u) for i, u in enumerate(honest[:4])), Update(9, None, "disk error")])
    assert _codes(result)[-1] == "unreadable" and "disk error" in result.verdicts[-1].reason
    assert result.accepted and result.blamed() == []


def test_no_update_passing_screening_takes_no_step_and_blames_no_relative_verdict(world):
    base, honest, evaluate = world
    flipped = {k: -v for k, v in honest[0].items()}
    result = _run(base, [honest[0], flipped], evaluate, eval_before=5.0)
    assert _codes(result) == ["direction", "direction"]
    assert not result.accepted and result.reason == "no update passed screening"
    assert result.eval_before == 5.0 and result.eval_after is None and result.blamed() == []


def test_phases_are_reported_and_the_optimizer_state_carries_over(world):
    base, honest, evaluate = world
    phases, steps = [], []
    first = _run(base, honest, evaluate, on_phase=phases.append, on_step=lambda state, opt: steps.append(opt.steps))
    assert phases == ["screen", "step", "evaluate"] and steps == [1]
    second = _run(first.new_state, honest, evaluate, outer_state=first.optimizer.state_tensors(),
                  eval_before=first.eval_after)
    manual = OuterOptimizer(base)
    from diloco.aggregate import aggregate

    g = aggregate(honest, "trimmed_mean", trim_fraction=0.25)
    manual.step(g)
    expected = manual.step(g)
    assert second.optimizer.steps == 2
    assert all(torch.allclose(second.new_state[k], expected[k], atol=1e-6) for k in expected)
