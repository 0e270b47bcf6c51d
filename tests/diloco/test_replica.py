"""Spot re-computation's comparison: the same task computed twice agrees, anything else does not."""

import pytest
import torch

from diloco.codecs import decode_update, encode_update, reference_of
from diloco.data import encode_documents, load_documents, shard_documents
from diloco.inner import InnerConfig, inner_train
from diloco.models import init_state, model_with_weights
from diloco.replica import Side, Tolerance, centre_cosine, compare, favoured, robust_centre, sample_shards

CONFIG = {"n_layer": 1, "n_embd": 32, "n_head": 4, "block_size": 32}
CFG = InnerConfig(steps=4, lr=3e-3, batch_size=4, seq_len=32, warmup=0)


@pytest.fixture(scope="module")
def task():
    docs = load_documents("builtin:python-docs")
    shards = [encode_documents(shard_documents(docs, i, 2)) for i in range(2)]
    return init_state("byte-gpt", CONFIG, 0), shards


def _train(state, tokens, seed, threads=None):
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        model = model_with_weights("byte-gpt", CONFIG, {k: v.clone() for k, v in state.items()})
        delta = inner_train(model, tokens, CFG, seed=seed).pseudo_gradient
    finally:
        torch.set_num_threads(before)
    return decode_update(encode_update(delta, "int8"), reference_of(state))


def test_the_same_task_computed_twice_agrees_even_with_another_thread_count(task):
    state, shards = task
    a = _train(state, shards[0], seed=7)
    b = _train(state, shards[0], seed=7, threads=1)
    got = compare(a, b)
    assert got.agreed, got
    assert got.cosine > 0.999 and got.norm_rel < 1e-3


def test_other_work_and_free_riding_disagree(task):
    state, shards = task
    honest = _train(state, shards[0], seed=7)
    another_seed = _train(state, shards[0], seed=8)
    another_shard = _train(state, shards[1], seed=7)
    gen = torch.Generator().manual_seed(0)
    noise = {k: torch.randn(v.shape, generator=gen) for k, v in honest.items()}
    scale = (sum(float((v.double() ** 2).sum()) for v in honest.values())
             / sum(float((v.double() ** 2).sum()) for v in noise.values())) ** 0.5
    for other in (another_seed, another_shard, {k: v * scale for k, v in noise.items()},
                  {k: 2 * v for k, v in honest.items()}):
        got = compare(honest, other)
        assert not got.agreed, got
    assert not compare(honest, {k: torch.zeros_like(v) for k, v in honest.items()}).agreed
    nan = {k: v.clone() for k, v in honest.items()}
    next(iter(nan.values())).view(-1)[0] = float("nan")
    assert not compare(honest, nan).agreed
    assert not compare(honest, dict(list(honest.items())[:1])).agreed


def test_tolerances_are_the_limits_of_agreement():
    a = {"w": torch.tensor([1.0, 0.0])}
    b = {"w": torch.tensor([1.0, 0.1])}  # cosine 0.995, norm 0.5% larger
    assert compare(a, b, tolerance=Tolerance(cosine=0.99, norm_rel=0.01)).agreed
    assert not compare(a, b, tolerance=Tolerance(cosine=0.999, norm_rel=0.01)).agreed
    assert not compare(a, b, tolerance=Tolerance(cosine=0.99, norm_rel=0.001)).agreed
    with pytest.raises(ValueError):
        Tolerance(cosine=1.5)


def test_sampling_is_a_reproducible_fraction_of_shards():
    assert sample_shards(seed=3, shards=8, fraction=0.3) == sample_shards(seed=3, shards=8, fraction=0.3)
    assert sample_shards(seed=3, shards=8, fraction=0.0) == []
    drawn = sum(len(sample_shards(seed=s, shards=10, fraction=0.2)) for s in range(400))
    assert 0.15 < drawn / 4000 < 0.25
    assert len({tuple(sample_shards(seed=s, shards=10, fraction=0.2)) for s in range(50)}) > 10
    with pytest.raises(ValueError):
        sample_shards(seed=1, shards=4, fraction=0.6)


def test_the_round_keeps_the_member_its_checks_favour():
    assert favoured(Side("a", False), Side("b", True))[0] == "b"
    assert favoured(Side("a", True, own_gain=0.01), Side("b", True, own_gain=0.2))[0] == "b"
    assert favoured(Side("a", True, centre_cosine=0.9), Side("b", True, centre_cosine=0.1))[0] == "a"
    assert favoured(Side("a", True), Side("b", True))[0] == "a"


def test_the_robust_centre_is_not_moved_by_one_outlier():
    others = [{"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([1.1, 0.9])}, {"w": torch.tensor([-500.0, 9e3])}]
    centre = robust_centre(others)
    assert centre_cosine({"w": torch.tensor([1.0, 1.0])}, centre) > 0.99
    assert robust_centre([]) is None and centre_cosine({"w": torch.ones(2)}, None) is None
