"""The contribution stage of the outer round: replays and free-riders are turned away before the aggregate,
blamed and never credited; honest updates of a few inner steps pass and carry their scores."""

import pytest
import torch

from diloco.contributions import ContributionCheck, check_contributions, step_sketch
from diloco.data import encode_documents, load_documents, shard_documents, split_documents
from diloco.evaluate import evaluate_loss
from diloco.inner import InnerConfig, inner_train
from diloco.models import build_model, init_state, model_with_weights
from diloco.replay import Earlier
from diloco.round import AggregatorSpec, Update, outer_round
from diloco.scoring import score_windows

ARCH = "byte-gpt"
K = 4


@pytest.fixture(scope="module")
def world():
    config = {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 32}
    train, held = split_documents(load_documents("builtin:python-docs"), 0.1)
    shards = [encode_documents(shard_documents(train, i, K)) for i in range(K)]
    return config, shards, encode_documents(held)


def _honest(config, base, shards, r):
    out = {}
    for s in range(K):
        model = build_model(ARCH, config)
        model.load_state_dict(base)
        out[s] = inner_train(model, shards[s], InnerConfig(steps=3, lr=3e-3, batch_size=8, seq_len=32),
                             seed=100 * r + s).pseudo_gradient
    return out


def _check(config, shards, ids_to_shard, earlier, sha, r):
    keys = set(ids_to_shard.values()) | {(s + 1) % K for s in ids_to_shard.values()}
    return ContributionCheck(arch=ARCH, config=config, sketch_seed=77,
                             windows={s: score_windows(shards[s], count=16, seq_len=32, seed=1000 * r + s)
                                      for s in keys},
                             own=dict(ids_to_shard), other={i: (s + 1) % K for i, s in ids_to_shard.items()},
                             sha256=sha, earlier=earlier)


def test_free_riders_earn_nothing_and_honest_updates_pass(world):
    config, shards, held = world
    base = init_state(ARCH, config, seed=0)

    def evaluate(state):
        return evaluate_loss(model_with_weights(ARCH, config, state), held, batch_size=8, seq_len=32, batches=4)

    # Round 1: four honest workers.
    honest = _honest(config, base, shards, 1)
    updates = [Update(f"r1-{s}", honest[s]) for s in range(K)]
    ids = {f"r1-{s}": s for s in range(K)}
    check = _check(config, shards, ids, [], {u.id: f"sha-{u.id}" for u in updates}, 1)
    first = outer_round(base_state=base, updates=updates, evaluate=evaluate, aggregator=AggregatorSpec("mean"),
                        contributions=lambda ups, vs: check_contributions(base, ups, vs, check))
    assert first.accepted and [v.accepted for v in first.verdicts] == [True] * K
    assert all(v.score["passed"] and v.score["own_gain"] > 0 for v in first.verdicts)
    assert "contributions_s" in first.timings
    earlier = [Earlier(v.id, v.extra["sketch"], f"sha-{v.id}") for v in first.verdicts]
    earlier.append(Earlier("outer step of round 1", step_sketch(base, first.new_state, seed=77)))
    public = {k: base[k] - first.new_state[k] for k in base}
    theta = first.new_state

    # Round 2: two honest workers, and free-riders on shards 2 and 3: the public step, the same bytes
    # as a round-1 update, noise at the honest norm; plus a colluder copying the first free-rider.
    honest2 = _honest(config, theta, shards, 2)
    norm = sum(float(v.norm()) ** 2 for v in honest2[0].values()) ** 0.5
    gen = torch.Generator().manual_seed(5)
    noise = {k: torch.randn(v.shape, generator=gen) for k, v in theta.items()}
    noise_norm = sum(float(v.norm()) ** 2 for v in noise.values()) ** 0.5
    noise = {k: v * norm / noise_norm for k, v in noise.items()}
    updates2 = [Update("h0", honest2[0]), Update("h1", honest2[1]), Update("public", public),
                Update("replay", honest[3]), Update("noise", noise),
                Update("copy", {k: v.clone() for k, v in public.items()})]
    ids2 = {"h0": 0, "h1": 1, "public": 2, "replay": 3, "noise": 2, "copy": 3}
    sha2 = {u.id: f"sha2-{u.id}" for u in updates2} | {"replay": "sha-r1-3"}
    check2 = _check(config, shards, ids2, earlier, sha2, 2)
    second = outer_round(base_state=theta, updates=updates2, evaluate=evaluate, aggregator=AggregatorSpec("mean"),
                         previous_norms=[v.norm for v in first.verdicts],
                         contributions=lambda ups, vs: check_contributions(theta, ups, vs, check2))
    verdicts = {v.id: v for v in second.verdicts}
    assert verdicts["h0"].accepted and verdicts["h1"].accepted, [(v.id, v.reason) for v in second.verdicts]
    assert second.accepted
    for rider in ("public", "replay", "noise", "copy"):
        v = verdicts[rider]
        assert not v.accepted and not v.credited(step_accepted=True)
        assert v.blamed(step_accepted=True)
        if v.code == "replay":  # a replay is the update's own fault whatever the round did
            assert v.blamed(step_accepted=False)
    assert verdicts["public"].code == "replay" and "outer step of round 1" in verdicts["public"].reason
    assert verdicts["replay"].code == "replay" and "same sha256" in verdicts["replay"].reason
    assert verdicts["copy"].code == "replay"
    assert verdicts["noise"].code in ("score", "norm_low", "norm_high", "direction"), verdicts["noise"].reason
    # Only the honest updates made the step: it equals the mean of the two.
    assert [v.id for v in second.credited()] == ["h0", "h1"]


def test_without_scoring_only_replays_are_checked(world):
    config, shards, _ = world
    base = init_state(ARCH, config, seed=1)
    honest = _honest(config, base, shards, 3)
    updates = [Update("a", honest[0]), Update("b", honest[0])]

    class V:
        def __init__(self, i):
            self.id, self.accepted, self.code, self.reason, self.score, self.extra = i, True, "accepted", "", None, {}

    verdicts = [V("a"), V("b")]
    check = _check(config, shards, {"a": 0, "b": 1}, [], {}, 3)
    check.score = False
    sketches = check_contributions(base, updates, verdicts, check)
    assert set(sketches) == {"a", "b"}
    assert verdicts[0].accepted and verdicts[0].score is None
    assert not verdicts[1].accepted and verdicts[1].code == "replay" and "update a of this round" in verdicts[1].reason
