"""Rounds too small or too early for the centre still pay only for work: an update must beat its share of the
last public outer step (its projection on it) on the windows its task trained on. A free-rider dressing up
that step (scaled, with noise, so that the replay check does not see it) earns nothing; honest work does."""

import math

import pytest
import torch

from diloco.aggregate import aggregate
from diloco.contributions import ContributionCheck, add_trained_windows, check_contributions, shard_windows
from diloco.data import encode_documents, load_documents, sample_batch, shard_documents, split_documents
from diloco.inner import InnerConfig, inner_train
from diloco.models import build_model, init_state
from diloco.outer import OuterOptimizer
from diloco.replay import cosine, sketch
from diloco.round import Update, Verdict
from diloco.scoring import Gains, judge, trained_windows

ARCH = "byte-gpt"
K = 4
INNER = InnerConfig(steps=12, lr=3e-3, batch_size=8, seq_len=32, warmup=2)


@pytest.fixture(scope="module")
def world():
    config = {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 32}
    train, _ = split_documents(load_documents("builtin:python-docs"), 0.1)
    shards = {s: encode_documents(shard_documents(train, s, K)) for s in range(K)}
    return config, shards


def _train(config, base, tokens, seed):
    model = build_model(ARCH, config)
    model.load_state_dict(base)
    return inner_train(model, tokens, INNER, seed=seed).pseudo_gradient


def _norm(u):
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in u.values()))


def test_the_windows_a_task_trained_on_are_redrawn_from_its_seed(world):
    _config, shards = world
    gen = torch.Generator().manual_seed(77)
    drawn = torch.cat([torch.cat([x, y[:, -1:]], dim=1)
                       for x, y in (sample_batch(shards[1], 8, 32, gen) for _ in range(12))])
    picked = trained_windows(shards[1], steps=12, batch_size=8, seq_len=32, seed=77, count=20, pick_seed=5)
    assert picked.shape == (20, 33)
    rows = {tuple(r.tolist()) for r in drawn}
    assert all(tuple(r.tolist()) in rows for r in picked)
    # Another pick seed picks other batches of the same task; a task with fewer windows gives them all.
    other = trained_windows(shards[1], steps=12, batch_size=8, seq_len=32, seed=77, count=20, pick_seed=6)
    assert not torch.equal(picked, other)
    assert trained_windows(shards[1], steps=2, batch_size=8, seq_len=32, seed=77, count=50, pick_seed=5).shape[0] == 16


@pytest.fixture(scope="module")
def round_two(world):
    """A run's round 1 of four honest workers, its public step, and round 2's base weights."""
    config, shards = world
    base = init_state(ARCH, config, seed=0)
    first = [_train(config, base, shards[s], seed=100 + s) for s in range(K)]
    theta = OuterOptimizer(base).step(aggregate(first, "mean"))
    public = {k: base[k] - theta[k] for k in base}
    return config, shards, theta, public


def _check(config, shards, theta, ids, seeds, public, r=2):
    windows = shard_windows(shards, count=16, seq_len=32, seed=900 + r, own=False)
    own = add_trained_windows(windows, {i: (ids[i], seeds[i]) for i in ids}, shards, steps=INNER.steps,
                              batch_size=INNER.batch_size, seq_len=INNER.seq_len, count=16, seed=900 + r)
    other = {i: [("other", (s + j) % K) for j in range(1, K)] for i, s in ids.items()}
    return ContributionCheck(arch=ARCH, config=config, windows=windows, own=own, other=other, sketch_seed=3,
                             public_step=public)


def test_in_a_round_too_small_for_a_centre_a_dressed_up_public_step_earns_nothing(round_two):
    config, shards, theta, public = round_two
    honest = _train(config, theta, shards[0], seed=200)
    for noise_seed in (1, 2, 3):
        # 0.8 x the public step plus noise: no replay (cosine under 0.99), lowers every shard's loss.
        gen = torch.Generator().manual_seed(noise_seed)
        noise = {k: torch.randn(v.shape, generator=gen) for k, v in public.items()}
        scale = 0.3 * _norm(public) / _norm(noise)
        rider = {k: 0.8 * public[k] + scale * noise[k] for k in public}
        assert cosine(sketch(rider, seed=3), sketch(public, seed=3)) < 0.99
        ids, seeds = {"honest": 0, "rider": 1}, {"honest": 200, "rider": 201}
        verdicts = [Verdict(i, True, "accepted", "") for i in ids]
        check_contributions(theta, [Update("honest", honest), Update("rider", rider)], verdicts,
                            _check(config, shards, theta, ids, seeds, public))
        by_id = {v.id: v for v in verdicts}
        assert by_id["rider"].score["own_gain"] > 0  # it does lower its shard's loss: the old rule paid it
        assert not by_id["rider"].accepted and by_id["rider"].code == "score", by_id["rider"].reason
        assert "last public outer step" in by_id["rider"].reason and "too few updates" in by_id["rider"].reason
        assert by_id["honest"].accepted, by_id["honest"].reason
        assert by_id["honest"].score["own_gain"] > by_id["honest"].score["public_own_gain"]


def test_without_a_public_step_the_small_round_still_asks_for_a_gain_beyond_chance(round_two):
    config, shards, theta, _public = round_two
    honest = _train(config, theta, shards[0], seed=300)
    gen = torch.Generator().manual_seed(2)
    noise = {k: torch.randn(v.shape, generator=gen) * (0.05 * _norm(honest) / math.sqrt(v.numel() * len(honest)))
             for k, v in honest.items()}
    ids, seeds = {"honest": 0, "rider": 1}, {"honest": 300, "rider": 301}
    updates = [Update("honest", honest), Update("rider", noise)]
    verdicts = [Verdict(i, True, "accepted", "") for i in ids]
    check_contributions(theta, updates, verdicts, _check(config, shards, theta, ids, seeds, None))
    by_id = {v.id: v for v in verdicts}
    assert by_id["honest"].accepted, by_id["honest"].reason
    assert not by_id["rider"].accepted and by_id["rider"].code == "score"


def _windows(gen, n, mean, spread):
    return mean + spread * torch.randn(n, generator=gen, dtype=torch.float64).float()


def test_in_an_inconclusive_round_the_public_step_sets_the_bar():
    # Eight updates, none specialised against the centre (too early to tell work apart). The honest ones
    # learnt their trained windows beyond what their share of the public step does on them; two free-riders
    # send the public step with a little noise: they lower the loss as much as that share, and no more.
    gen = torch.Generator().manual_seed(0)
    gains, centre, public = [], [], []
    for i in range(8):
        common = _windows(gen, 32, 0.3, 0.2)
        other = _windows(gen, 32, 0.3, 0.2)
        step = common + _windows(gen, 32, 0.0, 0.02)  # the public share's gain on these windows
        step_other = other + _windows(gen, 32, 0.0, 0.02)
        own = step + (_windows(gen, 32, 0.1, 0.05) if i < 6 else _windows(gen, 32, 0.0, 0.02))
        gains.append(Gains(3.0, 3.0 - float(own.mean()), 3.0, 3.0 - float(other.mean()), own=own, other=other))
        centre.append(Gains(3.0, 3.0 - float(own.mean()), 3.0, 3.0 - float(other.mean()), own=own.clone(),
                            other=other.clone()))
        public.append(Gains(0.0, -float(step.mean()), 0.0, -float(step_other.mean()), own=step, other=step_other))
    scores = judge(gains, centre=centre, public=public)
    assert all("too early to tell work apart" in s.reason for s in scores)
    assert [s.passed for s in scores] == [True] * 6 + [False] * 2, [s.reason for s in scores]
    assert all("last public outer step" in s.reason for s in scores[6:])
    # Without the public step to judge against, the old fallback (own-shard gain) would have paid them.
    assert all(s.passed for s in judge(gains, centre=centre)[6:])
