"""Error feedback (SparseLoCo) and the published step an agent applies instead of downloading weights."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import save as st_save

from diloco.checkpoint import save_weights
from diloco.codecs import CodecError, decode_update, reference_of
from diloco.models import init_state
from diloco.outer import OuterOptimizer, published_delta
from diloco.sparse import (
    ErrorFeedback,
    apply_published_delta,
    decode_published_delta,
    encode_published_delta,
    published_meta,
)


def _rand(shapes, seed, scale=1e-3):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * scale for k, s in shapes.items()}


SHAPES = {"a.weight": (64, 96), "b.bias": (96,), "c": (5000,)}


# --- error feedback ----------------------------------------------------------------------------------------


def test_error_feedback_sends_the_sum_of_rounds_eventually():
    """What is sent plus what is kept always equals the decayed sum of the pseudo-gradients (β = 1: the sum)."""
    ef = ErrorFeedback(codec="topk2", beta=1.0, chunk=256, density=0.02)
    ref = {k: (s, torch.float32) for k, s in SHAPES.items()}
    sent_total = {k: torch.zeros(s) for k, s in SHAPES.items()}
    delta_total = {k: torch.zeros(s) for k, s in SHAPES.items()}
    for r in range(6):
        delta = _rand(SHAPES, r)
        data = ef.encode(delta)
        sent = decode_update(data, ref)
        for k in SHAPES:
            sent_total[k] += sent[k]
            delta_total[k] += delta[k]
    for k in SHAPES:
        assert torch.allclose(sent_total[k] + ef.error[k], delta_total[k], atol=1e-6)
    # and the buffer holds back most of each round, so it is not zero
    assert all(ef.error[k].abs().sum() > 0 for k in SHAPES)


def test_error_feedback_decays_with_beta():
    ef = ErrorFeedback(codec="topk4", beta=0.5, chunk=64, density=0.25)  # 16 of 64 values kept
    w = torch.full((64,), 0.1)
    w[::4] = 1.0
    ef.encode({"w": w})  # sends the sixteen 1.0s exactly, keeps the 0.1s
    assert torch.allclose(ef.error["w"], torch.where(w == 1.0, 0.0, 0.1))
    ef.encode({"w": torch.zeros(64)})  # e = 0.5 · e: sixteen of the 0.05s go out, 32 stay
    assert torch.isclose(ef.error["w"].sum(), torch.tensor(32 * 0.05))
    assert int((ef.error["w"] != 0).sum()) == 32


def test_error_feedback_residual_is_what_was_not_sent():
    ef = ErrorFeedback(codec="topk2", beta=0.95, chunk=64, density=0.0625)
    delta = _rand({"w": (640,)}, 3)
    data = ef.encode(delta)
    sent = decode_update(data, {"w": ((640,), torch.float32)})
    assert torch.allclose(ef.error["w"], delta["w"] - sent["w"])
    e1 = ef.error["w"].clone()
    d2 = _rand({"w": (640,)}, 4)
    sent2 = decode_update(ef.encode(d2), {"w": ((640,), torch.float32)})
    assert torch.allclose(ef.error["w"], 0.95 * e1 + d2["w"] - sent2["w"], atol=1e-7)


def test_error_feedback_save_load_continues_exactly():
    straight = ErrorFeedback(codec="topk2", chunk=256, density=0.03)
    resumed = ErrorFeedback(codec="topk2", chunk=256, density=0.03)
    ref = {k: (s, torch.float32) for k, s in SHAPES.items()}
    straight.encode(_rand(SHAPES, 1))
    resumed.encode(_rand(SHAPES, 1))
    resumed = ErrorFeedback.load(resumed.save(), ref)
    assert resumed.rounds == 1 and resumed.density == 0.03 and resumed.chunk == 256
    assert straight.encode(_rand(SHAPES, 2)) == resumed.encode(_rand(SHAPES, 2))
    fresh = ErrorFeedback.load(ErrorFeedback().save(), ref)
    assert fresh.error is None and fresh.rounds == 0


def test_error_feedback_load_refuses_foreign_or_mismatched_state():
    ref = {k: (s, torch.float32) for k, s in SHAPES.items()}
    ef = ErrorFeedback(codec="topk2", chunk=256)
    ef.encode(_rand(SHAPES, 1))
    with pytest.raises(CodecError, match="does not match"):
        ErrorFeedback.load(ef.save(), {"other": ((3,), torch.float32)})
    with pytest.raises(CodecError, match="lacks a valid"):
        ErrorFeedback.load(st_save({"error.a": torch.zeros(2)}), ref)
    bad = {f"error.{k}": v for k, v in ef.error.items()}
    bad["error.c"] = bad["error.c"].clone()
    bad["error.c"][0] = float("nan")
    meta = {"agora_error_feedback": json.dumps(ef._meta())}
    with pytest.raises(CodecError, match="finite float32"):
        ErrorFeedback.load(st_save(bad, metadata=meta), ref)
    with pytest.raises(CodecError, match="unknown entry"):
        ErrorFeedback.load(st_save({"momentum.a": torch.zeros(2)}, metadata=meta), ref)
    for key, value in (("codec", "int8"), ("density", 5), ("beta", 2), ("chunk", 100), ("rounds", -1)):
        m = {"agora_error_feedback": json.dumps({**ef._meta(), key: value})}
        with pytest.raises(CodecError):
            ErrorFeedback.load(st_save({}, metadata=m), ref)
    with pytest.raises(CodecError, match="sparse codec"):
        ErrorFeedback(codec="int8")


# --- the published step ------------------------------------------------------------------------------------


def _sparse_step(shapes, seed, density=0.05):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in shapes.items():
        v = torch.randn(s, generator=g) * 1e-3
        out[k] = torch.where(torch.rand(s, generator=g) < density, v, torch.zeros(s))
    return published_delta(out)


def test_published_step_round_trips_exactly_and_is_small():
    d = _sparse_step(SHAPES, 1)
    data = encode_published_delta(d, meta={"base": "ab" * 32})
    out = decode_published_delta(data, reference_of(d))
    assert all(torch.equal(out[k], d[k]) for k in d)
    assert published_meta(data) == {"base": "ab" * 32}
    n = sum(v.numel() for v in d.values())
    assert len(data) < 0.3 * n  # ~5% of values at 4 bytes each (offset + float16), not 4 bytes a parameter
    assert json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]["agora_step"]


def test_dense_and_fp32_steps_round_trip_exactly():
    dense = published_delta(_rand(SHAPES, 2))
    assert all(torch.equal(a, b) for a, b in zip(decode_published_delta(
        encode_published_delta(dense), reference_of(dense)).values(), dense.values(), strict=True))
    exact32 = _rand(SHAPES, 3)  # not float16 values: stored as float32
    data = encode_published_delta(exact32)
    assert '\\"values\\":\\"fp32\\"' in data[:400].decode("latin-1")
    out = decode_published_delta(data, reference_of(exact32))
    assert all(torch.equal(out[k], exact32[k]) for k in exact32)


def test_agent_rebuilds_the_servers_checkpoint_bitwise(tiny_config):
    """θ_{r+1} = θ_r − d on the agent gives the same checkpoint bytes (hence sha256) as the server's."""
    state = init_state("byte-gpt", tiny_config, seed=0)
    meta = {"arch": "byte-gpt", "config": tiny_config, "round": 1}
    server = OuterOptimizer(state, lr=1.0, momentum=0.0, publish="fp16")
    agent_state = {k: v.clone() for k, v in state.items()}
    for r in range(3):
        step = _sparse_step({k: v.shape for k, v in state.items()}, r, density=0.03)
        new = server.step(step)
        published = encode_published_delta(server.last_delta)
        agent_state = apply_published_delta(agent_state, published)
        meta["round"] = r + 1
        assert hashlib.sha256(save_weights(agent_state, meta)).digest() == \
            hashlib.sha256(save_weights(new, meta)).digest()


def test_momentum_step_is_published_dense_and_still_exact(tiny_config):
    state = init_state("byte-gpt", tiny_config, seed=0)
    server = OuterOptimizer(state, lr=0.7, momentum=0.9, publish="fp16")
    agent = {k: v.clone() for k, v in state.items()}
    for r in range(2):
        new = server.step(_sparse_step({k: v.shape for k, v in state.items()}, r))
        agent = apply_published_delta(agent, encode_published_delta(server.last_delta))
        assert all(torch.equal(agent[k], new[k]) for k in new)


def test_published_rounding_is_within_float16_precision():
    step = {"w": torch.tensor([1e-3, -2.5e-2, 3e-7, 0.0, -0.0]), "big": torch.tensor([1e-3, 1e5])}
    out = published_delta(step)
    d = out["w"]
    assert torch.equal(d.half().float(), d)
    assert torch.equal(out["big"], step["big"])  # beyond float16: the tensor keeps float32
    assert (d[:3] - step["w"][:3]).abs().max() <= 2**-11 * 2.5e-2
    assert str(d[4].item()) == "0.0"  # no -0.0: the sparse form carries no zeros


def _parts(data):
    from safetensors.torch import load

    return load(data)


def _step_file(parts, chunk=64, values="fp16"):
    meta = {"agora_step": json.dumps({"chunk": chunk, "format": "agora-step-v1", "values": values})}
    return st_save(parts, metadata=meta)


def _small():
    w = torch.zeros(128)
    w[torch.tensor([1, 5, 70])] = torch.tensor([0.5, -0.25, 2.0])
    return {"w": w}


@pytest.mark.parametrize("change,message", [
    ({"::idx": torch.tensor([5, 1, 6], dtype=torch.int16)}, "not unique and increasing"),
    ({"::idx": torch.tensor([1, 1, 6], dtype=torch.int16)}, "not unique"),
    ({"::idx": torch.tensor([1, 64, 6], dtype=torch.int16)}, "outside its chunk"),
    ({"::idx": torch.tensor([-1, 5, 6], dtype=torch.int16)}, "outside its chunk"),
    ({"::idx": torch.tensor([1, 5], dtype=torch.int16)}, "offsets, the counts say"),
    ({"::count": torch.tensor([2, 65], dtype=torch.int32)}, "count outside"),
    ({"::count": torch.tensor([-1, 1], dtype=torch.int32)}, "count outside"),
    ({"::count": torch.tensor([2, 1, 0], dtype=torch.int32)}, "::count must be int32 of shape"),
    ({"::count": torch.tensor([2, 1], dtype=torch.int64)}, "::count must be int32"),
    ({"::values": torch.tensor([0.5, float("inf"), 2.0], dtype=torch.float16)}, "non-finite"),
    ({"::values": torch.tensor([0.5, -0.25], dtype=torch.float16)}, "values, the counts say"),
    ({"::values": torch.tensor([0.5, -0.25, 2.0], dtype=torch.float32)}, "::values must be"),
])
def test_hostile_published_steps_are_refused(change, message):
    d = _small()
    parts = _parts(encode_published_delta(d, chunk=64, values="fp16"))  # the fp16 form's checks
    parts["::idx"] = torch.tensor([1, 5, 6], dtype=torch.int16)
    assert torch.equal(decode_published_delta(_step_file(parts), reference_of(d))["w"][[1, 5, 70]],
                       d["w"][[1, 5, 70]])
    parts.update(change)
    with pytest.raises(CodecError, match=message):
        apply_published_delta({"w": torch.zeros(128)}, _step_file(parts))


def test_published_step_header_is_checked():
    d = _small()
    parts = _parts(encode_published_delta(d, chunk=64, values="fp16"))
    ref = reference_of(d)
    for meta, message in (
        ({"agora_step": json.dumps({"chunk": 64, "format": "agora-update-v1", "values": "fp16"})}, "lacks a valid"),
        ({"agora_step": json.dumps({"chunk": 63, "format": "agora-step-v1", "values": "fp16"})}, "chunk"),
        ({"agora_step": json.dumps({"chunk": 64, "format": "agora-step-v1", "values": "int8"})}, "values"),
        ({"agora_step": json.dumps({"chunk": 64, "format": "agora-step-v1", "values": "fp16", "x": 1})}, "lacks"),
        ({"agora_step": json.dumps({"chunk": 64, "format": "agora-step-v1", "values": "fp16"}), "evil": "1"},
         "unknown metadata"),
        ({}, "lacks a valid"),
    ):
        with pytest.raises(CodecError, match=message):
            decode_published_delta(st_save(parts, metadata=meta), ref)
    with pytest.raises(CodecError, match="exactly the tensors"):
        decode_published_delta(_step_file({**parts, "w": torch.zeros(128)}), ref)
    with pytest.raises(CodecError, match="not a safetensors|too short"):
        decode_published_delta(b"garbage", ref)


def test_applying_a_step_to_the_wrong_model_or_dtype_is_refused():
    d = _small()
    data = encode_published_delta(d, chunk=64)
    with pytest.raises(CodecError, match="::count must be int32 of shape"):
        apply_published_delta({"w": torch.zeros(256)}, data)
    with pytest.raises(CodecError, match="float32 weights"):
        apply_published_delta({"w": torch.zeros(128, dtype=torch.float16)}, data)
    with pytest.raises(CodecError, match="non-finite"):
        apply_published_delta({"w": torch.full((128,), -3.4e38)}, encode_published_delta({"w": torch.full(
            (128,), 3.4e38)}, chunk=64))


def test_outer_momentum_is_error_feedback_for_sparse_codecs():
    from diloco.sparse import momentum_roles

    assert momentum_roles("topk2", 0.9) == (0.0, 0.9)
    assert momentum_roles("topk4", 0.0) == (0.0, 0.0)
    assert momentum_roles("int8", 0.9) == (0.9, None)
    with pytest.raises(ValueError, match="beta"):
        momentum_roles("topk2", 1.5)


# --- the outer round on sparse updates ----------------------------------------------------------------------


def _sparse_round_updates(k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"w": (64, 128), "b": (128,)}
    direction = {n: torch.randn(s, generator=g) * 1e-2 for n, s in shapes.items()}
    updates = []
    for _ in range(k):
        ef = ErrorFeedback(codec="topk2", chunk=1024, density=0.02)
        noisy = {n: d + 2 * torch.randn(d.shape, generator=g) * 1e-2 for n, d in direction.items()}
        updates.append(decode_update(ef.encode(noisy), reference_of(noisy)))
    return direction, updates


def _flat(d):
    return torch.cat([d[n].reshape(-1) for n in sorted(d)])


def test_screening_accepts_honest_sparse_updates():
    from diloco.round import Update, screen

    _, updates = _sparse_round_updates(k=6)
    verdicts = screen([Update(i, u) for i, u in enumerate(updates)])
    assert all(v.accepted for v in verdicts), [(v.code, v.reason) for v in verdicts]


def test_mean_keeps_the_signal_of_sparse_updates_where_a_trimmed_mean_loses_it():
    """Why a sparse run refuses trimmed mean and median: each coordinate is non-zero in few updates, so the
    per-value trimmed mean (here of 4, dropping the largest and smallest) mostly returns zero."""
    from diloco.aggregate import aggregate

    direction, updates = _sparse_round_updates(k=4)
    mean, clipped = (_flat(aggregate(updates, m)) for m in ("mean", "norm_clipped_mean"))
    trimmed = _flat(aggregate(updates, "trimmed_mean", trim_fraction=0.25))
    d = _flat(direction)
    assert torch.dot(mean, d) > 0 and torch.dot(clipped, d) > 0
    assert torch.dot(trimmed, d) < 0.5 * torch.dot(mean, d)
    assert (trimmed != 0).sum() < 0.5 * (mean != 0).sum()
