"""Published-step values as int8 times a power of two per chunk (``"values": "int8"``): what the server's
``publish="int8"`` rounding produces encodes so and rebuilds bitwise, anything else falls back to float16
or float32, and hostile int8 steps are refused."""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from diloco.codecs import SPARSE_CHUNKS, CodecError, decode_update, reference_of
from diloco.models import init_state
from diloco.outer import SPARSE_OUTER_LR, OuterOptimizer
from diloco.sparse import (
    EXP_RANGE,
    ErrorFeedback,
    apply_published_delta,
    decode_published_delta,
    encode_published_delta,
)

# The byte-level GPT of bench/fidelity.py's "byte-gpt" family: 137k parameters, 29 tensors.
BYTE_GPT = {"n_layer": 2, "n_embd": 64, "n_head": 4, "block_size": 64}


def _meta(data: bytes) -> dict:
    return json.loads(json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]["agora_step"])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _bitwise_equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(_bits(a[k]), _bits(b[k])) for k in a)


def test_int8_step_of_four_workers_is_smaller_and_rebuilds_the_server_bitwise():
    state = init_state("byte-gpt", BYTE_GPT, seed=0)
    ref = reference_of(state)
    server = OuterOptimizer(state, lr=SPARSE_OUTER_LR, momentum=0.0, publish="int8")
    workers = [ErrorFeedback(codec="topk2", density=0.02) for _ in range(4)]
    agent = {k: v.clone() for k, v in state.items()}
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        updates = [decode_update(w.encode({k: torch.randn(v.shape, generator=g) * 1e-3 for k, v in state.items()}),
                                 ref) for w in workers]
        new = server.step({k: sum(u[k] for u in updates) / 4 for k in ref})
        step = server.last_delta
        data, half = encode_published_delta(step), encode_published_delta(step, values="fp16")
        assert _meta(data) == {"chunk": 4096, "format": "agora-step-v1", "idx": "ef", "values": "int8"}
        assert _meta(half)["values"] == "fp16"
        parts = st_load(data)
        assert parts["::values"].dtype == torch.int8 and parts["::exp"].dtype == torch.int8
        assert parts["::exp"].numel() == int((parts["::count"] > 0).sum())
        assert parts["::exp"].min() >= -24  # the server's rounding never goes finer than 2^-24
        # ~9% of the values carried, 8 bits each instead of 16, the offsets unchanged: 1.6x smaller
        assert len(half) >= 1.5 * len(data)
        assert _bitwise_equal(decode_published_delta(data, ref), step)
        assert _bitwise_equal(decode_published_delta(half, ref), step)
        agent = apply_published_delta(agent, data)
        assert _bitwise_equal(agent, new)
        assert _bitwise_equal(agent, server.params)


def test_a_dense_int8_chunk_decodes_its_zeros_as_positive_zero():
    w = torch.arange(-64, 64, dtype=torch.float32) * 2.0**-10  # every value of the chunk set: dense
    w[10] = 0.0
    data = encode_published_delta({"w": w}, chunk=64)
    parts = st_load(data)
    assert _meta(data)["values"] == "int8" and parts["::count"].tolist() == [64, 64]
    # absmax 64 · 2^-10 and 63 · 2^-10: e = -10 and -11, the finest quanta that hold them (q = 64, 126)
    assert parts["::exp"].tolist() == [-10, -11]
    out = decode_published_delta(data, reference_of({"w": w}))["w"]
    assert _bitwise_equal({"w": out}, {"w": w})
    assert _bits(out)[10] == 0 and _bits(out)[64] == 0  # +0.0, not -0.0
    rebuilt = apply_published_delta({"w": torch.ones(128)}, data)["w"]
    assert _bitwise_equal({"w": rebuilt}, {"w": torch.ones(128) - w})


def _fallback(values: torch.Tensor, length: int = 128) -> dict:
    w = torch.zeros(length)
    w[: values.numel()] = values
    return {"w": w}


@pytest.mark.parametrize("values,form", [
    (torch.tensor([1.0, 1.0 + 2**-10]), "fp16"),  # 11 bits in one chunk: a float16, not q · 2^e
    (torch.tensor([1.0, 1.0 + 2**-20]), "fp32"),
    (torch.tensor([2.0**-30]), "fp32"),  # finer than 2^-24, the server's finest quantum
    (torch.tensor([2.0**50, 2.0**49]), "fp32"),  # e = 43, beyond EXP_RANGE
    (torch.tensor([-0.0] + [1.0] * 63), "fp16"),  # a dense chunk with a -0.0: +0.0 would not be bitwise
])
def test_a_step_that_is_not_int8_exact_falls_back(values, form):
    d = _fallback(values)
    data = encode_published_delta(d, chunk=64)
    assert _meta(data)["values"] == form and "::exp" not in st_load(data)
    assert _bitwise_equal(decode_published_delta(data, reference_of(d)), d)


def test_one_inexact_chunk_sends_the_whole_step_as_float16():
    w = torch.zeros(128)
    w[3], w[64], w[65] = 0.75, 1.0, 1.0 + 2**-10  # chunk 0 is int8-exact, chunk 1 is not
    assert _meta(encode_published_delta({"w": w[:64].clone()}, chunk=64))["values"] == "int8"
    data = encode_published_delta({"w": w}, chunk=64)
    assert _meta(data)["values"] == "fp16"
    assert _bitwise_equal(decode_published_delta(data, reference_of({"w": w})), {"w": w})
    assert _meta(encode_published_delta({"w": w}, chunk=64, values="fp32"))["values"] == "fp32"


def test_int16_offsets_keep_their_release_s_values():
    d = {"w": torch.tensor([0.5, 0.0, -0.25, 0.0] * 32)}
    assert _meta(encode_published_delta(d, chunk=64, idx="int16"))["values"] == "fp16"
    with pytest.raises(CodecError, match="int8 step values need Elias–Fano"):
        encode_published_delta(d, chunk=64, idx="int16", values="int8")
    with pytest.raises(CodecError, match="values form 'int4'"):
        encode_published_delta(d, chunk=64, values="int4")


def test_the_int8_form_needs_fewer_bytes_where_a_chunk_goes_dense():
    # 52 of 64 set: Elias–Fano offsets (l = 0: 52 · 1 + 64 bits) cost less than 12 float16 zeros (192
    # bits), more than 12 int8 zeros (96): the fp16 form sends the chunk sparse, the int8 form dense
    w = torch.zeros(64)
    w[:52] = 0.5
    assert st_load(encode_published_delta({"w": w}, chunk=64))["::count"].tolist() == [64]
    assert st_load(encode_published_delta({"w": w}, chunk=64, values="fp16"))["::count"].tolist() == [52]


# --- hostile int8 steps ------------------------------------------------------------------------------------


def _int8_step() -> tuple[dict, dict]:
    w = torch.zeros(192)
    w[torch.tensor([1, 5, 70, 71, 130])] = torch.tensor([0.5, -0.25, 3.0, 0.125, -127.0])
    data = encode_published_delta({"w": w}, chunk=64)
    assert apply_published_delta({"w": torch.zeros(192)}, data)["w"][[1, 5, 70, 71, 130]].tolist() == [
        -0.5, 0.25, -3.0, -0.125, 127.0]
    return st_load(data), _meta(data)


def _step(parts: dict, meta: dict) -> bytes:
    return st_save(parts, metadata={"agora_step": json.dumps(meta)})


def test_int8_step_parts_are_those_the_doc_describes():
    parts, meta = _int8_step()
    assert meta == {"chunk": 64, "format": "agora-step-v1", "idx": "ef", "values": "int8"}
    assert parts["::count"].tolist() == [2, 2, 1]
    # per chunk the finest 2^e with absmax / 2^e ≤ 127: 0.5 → 2^-7, 3.0 → 2^-5, 127 → 2^0
    assert parts["::exp"].tolist() == [-7, -5, 0]
    assert parts["::values"].tolist() == [64, -32, 96, 4, -127]


def test_exponents_at_the_ends_of_the_range_decode_exactly_and_finite():
    parts, meta = _int8_step()
    low, high = EXP_RANGE
    assert (low, high) == (-40, 40)
    for e, scale in ((low, 2.0**-40), (high, 2.0**40)):
        out = apply_published_delta({"w": torch.zeros(192)}, _step(
            {**parts, "::exp": torch.full((3,), e, dtype=torch.int8)}, meta))["w"]
        assert out[[1, 5, 70, 71, 130]].tolist() == [-64 * scale, 32 * scale, -96 * scale, -4 * scale, 127 * scale]


def _i8(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int8)


@pytest.mark.parametrize("change,meta_change,message", [
    ({"::values": _i8(64, -32, 96, 4, -128)}, {}, "::values has the int8 value -128"),
    ({"::exp": _i8(-7, -5, 41)}, {}, "::exp has an exponent outside -40..40"),
    ({"::exp": _i8(-41, -5, 0)}, {}, "::exp has an exponent outside -40..40"),
    ({"::exp": _i8(-7, -5)}, {}, r"::exp must be int8 of shape \(3,\)"),
    ({"::exp": _i8(-7, -5, 0, 0)}, {}, r"::exp must be int8 of shape \(3,\)"),
    ({"::exp": _i8(-7, -5, 0).reshape(3, 1)}, {}, r"::exp must be int8 of shape \(3,\)"),
    ({"::exp": torch.tensor([-7, -5, 0], dtype=torch.int16)}, {}, "::exp must be int8"),
    ({"::values": _i8(64, -32, 96, 4)}, {}, "::values has 4 values, the counts say 5"),
    ({"::values": _i8(64, -32, 96, 4, -127, 1)}, {}, "::values has 6 values, the counts say 5"),
    ({"::values": torch.tensor([0.5, -0.25, 3.0, 0.125, -127.0], dtype=torch.float16)}, {},
     "::values must be a 1-d torch.int8 tensor"),
    ({"::values": _i8(64, -32, 96, 4, -127).reshape(5, 1)}, {}, "::values must be a 1-d torch.int8"),
    ({"::count": torch.tensor([2, 2, 0], dtype=torch.int32)}, {}, "values, the counts say"),
    ({"::exp": None}, {}, "int8 values must hold exactly the tensors ::count, ::idx, ::values, ::exp"),
    ({}, {"values": "fp16"}, "fp16 values must hold exactly the tensors ::count, ::idx, ::values$"),
    ({"::exp": None}, {"values": "fp16"}, "::values must be a 1-d torch.float16 tensor, got torch.int8"),
    ({"::exp": None, "::values": torch.tensor([0.5, -0.25, 3.0, 0.125, -127.0])}, {"values": "fp16"},
     "::values must be a 1-d torch.float16 tensor, got torch.float32"),
    ({}, {"values": "int4"}, "values 'int4' must be one of int8, fp16, fp32"),
])
def test_hostile_int8_steps_are_refused(change, meta_change, message):
    parts, meta = _int8_step()
    parts = {k: v for k, v in {**parts, **change}.items() if v is not None}
    with pytest.raises(CodecError, match=message):
        apply_published_delta({"w": torch.zeros(192)}, _step(parts, {**meta, **meta_change}))


# --- any q, e and sparsity ---------------------------------------------------------------------------------


@hypothesis_settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=3), chunk=st.sampled_from(SPARSE_CHUNKS[:5]),
       density=st.sampled_from([0.0, 0.02, 0.1, 0.5, 0.9, 1.0]), exps=st.lists(st.integers(-30, 45), min_size=1,
                                                                             max_size=8),
       seed=st.integers(0, 2**16))
def test_int8_steps_round_trip_bitwise(sizes, chunk, density, exps, seed):
    """Values ``q · 2^e`` with e drawn per chunk: int8 whenever every chunk's e lies in -24..40 (the
    encoder's e is then at most the drawn one and at least -24, so it holds every value), and exact
    in whatever form the encoder picks."""
    g = torch.Generator().manual_seed(seed)
    step, int8_expected = {}, True
    for i, n in enumerate(sizes):
        q = torch.randint(-127, 128, (n,), generator=g).float()
        q = torch.where(torch.rand(n, generator=g) < density, q, torch.zeros(n))
        e = torch.tensor([exps[(i + c) % len(exps)] for c in range(-(-n // chunk))], dtype=torch.int64)
        e_each = e.repeat_interleave(chunk)[:n]
        step[f"t{i}"] = q * torch.pow(2.0, e_each.double()).float() + 0.0  # q · 2^e exactly; no -0.0
        carrying = torch.zeros(e.numel(), dtype=torch.bool)
        if n:
            carrying[torch.nonzero(q).reshape(-1) // chunk] = True
        int8_expected &= bool(((e[carrying] >= -24) & (e[carrying] <= 40)).all())
    ref = reference_of(step)
    data = encode_published_delta(step, chunk=chunk)
    if int8_expected:
        assert _meta(data)["values"] == "int8"
    assert _bitwise_equal(decode_published_delta(data, ref), step)
    state = {k: torch.randn(v.shape, generator=g) for k, v in step.items()}
    assert _bitwise_equal(apply_published_delta(state, data), {k: state[k] - step[k] for k in step})
