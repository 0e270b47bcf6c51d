"""Scoring a contribution: an update that trained on its own shard passes; noise, another shard's work, a copy
of the round's consensus and a non-finite update do not; the verdict is deterministic."""

import math

import pytest
import torch

from diloco.data import encode_documents, load_documents, shard_documents, split_documents
from diloco.inner import InnerConfig, inner_train
from diloco.models import build_model, init_state
from diloco.scoring import Gains, judge, score_windows, specialisation, update_gains, windows_loss

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
    assert "own windows" in scores[3].reason
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


def _windows(gen, n, mean, spread=0.05):
    return mean + spread * torch.randn(n, generator=gen, dtype=torch.float64).float()


def _round(gen, *, honest, copies, specialised=0.08, n=32, copy_noise=0.0):
    """Per-window gains of a round against its centre: common[w] is what any step teaches window w; an honest
    update gains ``specialised`` more than the centre on its own shard and a little less elsewhere, a copy of
    the consensus gains what the centre gains (plus noise)."""
    common_own = [_windows(gen, n, 0.3, 0.2) for _ in range(honest + copies)]
    common_other = [_windows(gen, n, 0.3, 0.2) for _ in range(honest + copies)]
    gains, centre = [], []
    for i in range(honest + copies):
        spread = 0.05 if i < honest else copy_noise
        extra_own, extra_other = (specialised, -specialised / 4) if i < honest else (0.0, 0.0)
        own = common_own[i] + _windows(gen, n, extra_own, spread)
        other = common_other[i] + _windows(gen, n, extra_other, spread)
        gains.append(Gains(3.0, 3.0 - float(own.mean()), 3.0, 3.0 - float(other.mean()), own=own, other=other))
        centre.append(Gains(3.0, 3.0 - float(common_own[i].mean()), 3.0, 3.0 - float(common_other[i].mean()),
                            own=common_own[i], other=common_other[i]))
    return gains, centre


def test_a_copy_of_the_consensus_learns_no_shard_of_its_own_and_fails():
    gains, centre = _round(torch.Generator().manual_seed(0), honest=6, copies=2)
    scores = judge(gains, centre=centre)
    assert [s.passed for s in scores] == [True] * 6 + [False] * 2, [s.reason for s in scores]
    assert all(s.z > 2 for s in scores[:6])
    assert "beyond the round's centre" in scores[7].reason
    # The copies gain exactly as much as the centre: a positive own-shard gain, but nothing of their own.
    assert scores[6].own_gain > 0 and scores[6].centre_own_gain == pytest.approx(scores[6].own_gain)
    # The score is the difference of the paired differences.
    score, z = specialisation(gains[0], centre[0])
    d_own, d_other = gains[0].own - centre[0].own, gains[0].other - centre[0].other
    assert score == pytest.approx(float(d_own.mean() - d_other.mean()), rel=1e-5)
    assert z == pytest.approx(score / math.hypot(float(d_own.std()) / 32 ** 0.5, float(d_other.std()) / 32 ** 0.5),
                              rel=1e-4)


def test_an_update_with_nothing_of_its_own_passes_only_as_often_as_chance_allows():
    # A copy plus noise: its z is roughly standard normal, so z >= 2 lets about one in 44 through, while
    # every honest update passes.
    gen = torch.Generator().manual_seed(3)
    passed_copies, passed_honest = 0, 0
    for _ in range(60):
        gains, centre = _round(gen, honest=6, copies=2, copy_noise=0.05)
        scores = judge(gains, centre=centre)
        passed_honest += sum(s.passed for s in scores[:6])
        passed_copies += sum(s.passed for s in scores[6:])
    assert passed_honest == 360
    assert passed_copies / 120 < 0.06, passed_copies


def test_a_near_copy_of_the_consensus_earns_nothing_even_when_chance_gives_it_a_large_z():
    # "A little is enough" sits so close to the centre that its standard error is tiny: chance alone gives
    # it z >= 2 now and then, but its score is a sliver of an honest update's.
    gen = torch.Generator().manual_seed(4)
    passed, passed_without_share = 0, 0
    for _ in range(60):
        gains, centre = _round(gen, honest=6, copies=2, copy_noise=0.002)
        scores = judge(gains, centre=centre)
        assert all(s.passed for s in scores[:6]), [s.reason for s in scores[:6]]
        passed += sum(s.passed for s in scores[6:])
        passed_without_share += sum(s.passed for s in judge(gains, centre=centre, min_share=0.0)[6:])
        assert all("median score" in s.reason for s in scores[6:] if s.z >= 2)
    assert passed_without_share > 0  # chance did hand some of them z >= 2 ...
    assert passed == 0  # ... and still none earned anything


def test_a_minority_cannot_make_a_round_inconclusive():
    # Three copies among eight: the median z is still an honest update's, so the copies are still judged.
    gains, centre = _round(torch.Generator().manual_seed(1), honest=5, copies=3)
    scores = judge(gains, centre=centre)
    assert [s.passed for s in scores] == [True] * 5 + [False] * 3, [s.reason for s in scores]


def test_a_round_too_early_to_tell_work_apart_falls_back_to_the_own_shard_gain():
    # Nobody has specialised yet (a first round from a random start): refusing the z's would refuse honest work.
    gains, centre = _round(torch.Generator().manual_seed(2), honest=6, copies=0, specialised=0.0)
    scores = judge(gains, centre=centre)
    assert all(s.passed for s in scores), [s.reason for s in scores]
    assert all("too early to tell work apart" in s.reason for s in scores)
    # ... but an update that does not even lower its own shard's loss still fails.
    worse = Gains(3.0, 3.2, 3.0, 3.1, own=torch.full((32,), -0.2), other=torch.full((32,), -0.1))
    assert not judge([*gains, worse], centre=[*centre, centre[0]])[-1].passed


def test_an_update_that_learns_other_data_better_than_its_own_shard_fails():
    scores = judge([Gains(3.0, 2.6, 3.0, 2.7), Gains(3.0, 2.6, 3.0, 2.7), Gains(3.0, 2.8, 3.0, 2.0)])
    assert [s.passed for s in scores] == [True, True, False]
    assert "learns other data" in scores[2].reason
    with pytest.raises(ValueError):
        judge([], tolerance=1.0)
    with pytest.raises(ValueError):
        judge([], min_z=-1.0)


def test_windows_need_enough_tokens():
    with pytest.raises(ValueError, match="seq_len"):
        score_windows(torch.zeros(10, dtype=torch.long), count=2, seq_len=32, seed=0)
    w = score_windows(torch.arange(1000), count=4, seq_len=8, seed=1)
    assert w.shape == (4, 9) and torch.equal(w[:, 1:] - w[:, :-1], torch.ones(4, 8, dtype=torch.long))
