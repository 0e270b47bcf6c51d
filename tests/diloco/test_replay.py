"""Replay detection: the same update, a rescaled or lightly perturbed copy, and a public outer step are
replays; honest updates of other shards are not; sketches survive JSON."""

import json
import math

import pytest
import torch

from diloco.data import encode_documents, load_documents, shard_documents, split_documents
from diloco.inner import InnerConfig, inner_train
from diloco.models import build_model, init_state
from diloco.outer import OuterOptimizer
from diloco.replay import Earlier, cosine, replay_check, sketch, sketch_from_json, sketch_to_json

ARCH = "byte-gpt"


def _flat_cos(a, b):
    fa = torch.cat([v.reshape(-1) for _, v in sorted(a.items())])
    fb = torch.cat([v.reshape(-1) for _, v in sorted(b.items())])
    return float(torch.nn.functional.cosine_similarity(fa, fb, dim=0))


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    config = {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 32}
    train, _ = split_documents(load_documents("builtin:python-docs"), 0.1)
    shards = [encode_documents(shard_documents(train, i, 3)) for i in range(3)]
    base = init_state(ARCH, config, seed=0)
    updates = []
    for s in range(3):
        model = build_model(ARCH, config)
        model.load_state_dict(base)
        updates.append(inner_train(model, shards[s], InnerConfig(steps=4, lr=3e-3, batch_size=8, seq_len=32),
                                   seed=s).pseudo_gradient)
    return base, updates


def test_the_sketch_estimates_cosines_and_is_linear(honest):
    _, updates = honest
    a, b = updates[0], updates[1]
    sa, sb = sketch(a, seed=7), sketch(b, seed=7)
    assert abs(cosine(sa, sb) - _flat_cos(a, b)) < 0.1
    both = {k: a[k] + 2 * b[k] for k in a}
    assert torch.allclose(sketch(both, seed=7), sa + 2 * sb, rtol=1e-4, atol=1e-6)
    assert not torch.equal(sa, sketch(a, seed=8))  # another secret, other signs


def test_replays_are_caught_and_honest_updates_are_not(honest):
    base, updates = honest
    seed = 1234
    earlier = [Earlier(f"task:{i}", sketch(u, seed=seed), f"sha{i}") for i, u in enumerate(updates[:2])]
    # An honest update of another shard: not a replay.
    fresh = replay_check(sha256="sha2", update_sketch=sketch(updates[2], seed=seed), earlier=earlier)
    assert not fresh.replay and fresh.max_cosine < 0.99
    # The same bytes again.
    same = replay_check(sha256="sha0", update_sketch=sketch(updates[0], seed=seed), earlier=earlier)
    assert same.replay and "same sha256" in same.reason and same.closest == "task:0"
    # The same update rescaled and with a little noise (new bytes, same direction).
    gen = torch.Generator().manual_seed(3)
    twisted = {k: 1.7 * v + 0.01 * v.abs().mean() * torch.randn(v.shape, generator=gen) for k, v in updates[1].items()}
    near = replay_check(sha256="other", update_sketch=sketch(twisted, seed=seed), earlier=earlier)
    assert near.replay and near.closest == "task:1" and near.max_cosine > 0.99
    # A public outer step (θ_{r−1} − θ_r) uploaded as one's own update.
    opt = OuterOptimizer(base, lr=0.7, momentum=0.9)
    mean = {k: sum(u[k] for u in updates) / 3 for k in base}
    new = opt.step(mean)
    public = {k: base[k] - new[k] for k in base}
    steps = [Earlier("outer step of round 1", sketch(public, seed=seed))]
    caught = replay_check(sha256="x", update_sketch=sketch({k: v.clone() for k, v in public.items()}, seed=seed),
                          earlier=earlier + steps)
    assert caught.replay and caught.closest == "outer step of round 1"


def test_sketches_round_trip_through_json_and_bad_ones_are_refused(honest):
    _, updates = honest
    s = sketch(updates[0], seed=1, dim=256)
    back = sketch_from_json(json.loads(json.dumps(sketch_to_json(s))), dim=256)
    assert torch.equal(back, s)
    for bad in ([], [1.0, "x"], [math.inf], [True], "1,2", [1.0] * 300):
        with pytest.raises(ValueError):
            sketch_from_json(bad, dim=256)
    with pytest.raises(ValueError):
        sketch(updates[0], seed=1, dim=0)


def test_a_zero_or_non_finite_sketch_matches_nothing():
    zero = torch.zeros(16)
    nan = torch.full((16,), float("nan"))
    one = torch.ones(16)
    assert cosine(zero, one) == 0.0 and cosine(nan, one) == 0.0
    verdict = replay_check(sha256="", update_sketch=zero, earlier=[Earlier("task:1", zero, "")])
    assert not verdict.replay
