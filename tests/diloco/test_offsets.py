"""Elias–Fano offsets: the coder itself, sparse updates (``"idx": "ef"``) and published steps that use it, and
the int16 forms of the previous release, which must still decode to the same tensors."""

import base64
import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from diloco.codecs import (
    SPARSE_CHUNKS,
    CodecError,
    decode_update,
    ef_decode,
    ef_encode,
    ef_nbytes,
    encode_update,
    payload_nbytes,
    reference_of,
)
from diloco.models import init_state
from diloco.outer import published_delta
from diloco.sparse import apply_published_delta, decode_published_delta, encode_published_delta

# The byte-level GPT of bench/fidelity.py's "byte-gpt" family: 137k parameters, 29 tensors.
BYTE_GPT = {"n_layer": 2, "n_embd": 64, "n_head": 4, "block_size": 64}


def _layout(chunk: int, full: int, rest: int) -> torch.Tensor:
    return torch.tensor([chunk] * full + ([rest] if rest else []), dtype=torch.int64)


def _random_offsets(counts: torch.Tensor, lengths: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randperm(int(u), generator=g)[: int(n)].sort().values for n, u in zip(counts, lengths, strict=True)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def _bits(data: torch.Tensor) -> list[int]:
    return [(int(b) >> i) & 1 for b in data for i in range(8)]


def _from_bits(bits: list[int]) -> torch.Tensor:
    bits = bits + [0] * (-len(bits) % 8)
    return torch.tensor([sum(bits[j + i] << i for i in range(8)) for j in range(0, len(bits), 8)], dtype=torch.uint8)


# --- the coder ---------------------------------------------------------------------------------------------


@st.composite
def chunk_layouts(draw):
    """Chunk lengths (full chunks of an allowed size, maybe a partial last one) and a count per chunk,
    0 and full included."""
    chunk = draw(st.sampled_from(SPARSE_CHUNKS))
    full = draw(st.integers(0, 3 if chunk <= 4096 else 1))
    rest = draw(st.integers(0, chunk - 1))
    lengths = _layout(chunk, full, rest)
    counts = [draw(st.one_of(st.just(0), st.just(int(u)), st.integers(0, int(u)), st.integers(0, max(1, int(u) // 20))))
              for u in lengths]
    return torch.tensor(counts, dtype=torch.int64), lengths


@hypothesis_settings(max_examples=120, deadline=None)
@given(layout=chunk_layouts(), seed=st.integers(0, 2**16))
def test_offsets_round_trip_in_about_two_plus_log_bits_each(layout, seed):
    counts, lengths = layout
    offsets = _random_offsets(counts, lengths, seed)
    data = ef_encode(offsets, counts, lengths)
    assert data.dtype == torch.uint8 and data.numel() == ef_nbytes(counts, lengths)
    assert torch.equal(ef_decode(data, counts, lengths, what="::idx"), offsets)
    n, used = int(counts.sum()), counts > 0
    if n:
        u = int(lengths[used].sum())
        # N low parts of l ≤ log2(U/N) bits, N ones, fewer than 2N zeros (U / 2^l < 2N), one per used chunk more
        assert data.numel() * 8 < n * (3 + math.log2(u / n)) + int(used.sum()) + 8
    else:
        assert data.numel() == 0


@hypothesis_settings(max_examples=150, deadline=None)
@given(layout=chunk_layouts(), seed=st.integers(0, 2**16), flips=st.lists(st.integers(0, 10**6), min_size=1,
                                                                           max_size=3))
def test_decoding_a_damaged_encoding_gives_canonical_offsets_or_a_codec_error(layout, seed, flips):
    counts, lengths = layout
    data = ef_encode(_random_offsets(counts, lengths, seed), counts, lengths)
    if not data.numel():
        return
    bits = _bits(data)
    for f in flips:
        bits[f % len(bits)] ^= 1
    damaged = _from_bits(bits)
    try:
        off = ef_decode(damaged, counts, lengths, what="::idx")
    except CodecError as exc:
        assert "::idx" in str(exc)
        return
    chunk_of = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    assert ((off >= 0) & (off < lengths[chunk_of])).all()
    assert not ((chunk_of[1:] == chunk_of[:-1]) & (off[1:] <= off[:-1])).any()
    assert torch.equal(ef_encode(off, counts, lengths), damaged)  # one byte string per set of offsets


def test_empty_and_full_chunks():
    lengths = torch.tensor([64, 64, 64, 10])
    counts = torch.tensor([0, 64, 3, 10])
    offsets = torch.cat([torch.arange(64), torch.tensor([0, 17, 63]), torch.arange(10)])
    data = ef_encode(offsets, counts, lengths)
    assert torch.equal(ef_decode(data, counts, lengths, what="x"), offsets)
    none = torch.zeros(4, dtype=torch.int64)
    assert ef_encode(torch.zeros(0), none, lengths).numel() == 0
    assert ef_decode(torch.zeros(0, dtype=torch.uint8), none, lengths, what="x").numel() == 0


# One chunk of 100 with 3 offsets: l = ⌊log2(100/3)⌋ = 5, 4 buckets: 15 low bits, 3 + 4 high bits, 22 bits.
ONE = (torch.tensor([3]), torch.tensor([100]))


def test_the_bit_layout_is_the_documented_one():
    data = ef_encode(torch.tensor([1, 40, 99]), *ONE)
    low = [1, 0, 0, 0, 0] + [0, 0, 0, 1, 0] + [1, 1, 0, 0, 0]  # 1, 40 mod 32 = 8, 99 mod 32 = 3, LSB first
    high = [1, 0, 1, 0, 0, 1, 0]  # highs 0, 1, 3: bits 0 + 0, 1 + 1, 3 + 2
    assert _bits(data) == low + high + [0, 0]
    assert torch.equal(ef_decode(_from_bits(low + high), *ONE, what="x"), torch.tensor([1, 40, 99]))


@pytest.mark.parametrize("change,message", [
    (lambda b: b[:16], r"must be uint8 of shape \(3,\)"),  # a byte short
    (lambda b: b + [0] * 8, r"must be uint8 of shape \(3,\)"),  # a byte too many
    (lambda b: b[:22] + [0, 1], "non-zero padding"),
    (lambda b: b[:15] + [1, 1, 1, 0, 0, 1, 0] + b[22:], "marks 4 high parts, the counts say 3"),
    (lambda b: b[:15] + [1, 0, 1, 0, 0, 0, 0] + b[22:], "marks 2 high parts"),
    (lambda b: b[:15] + [1, 0, 1, 0, 0, 0, 1] + b[22:], "high part outside its chunk"),  # a 5th bucket
    (lambda b: [1] * 5 + b[5:10] + [1] * 5 + b[15:], "has an offset outside its chunk"),  # 99 → 3·32 + 31
    (lambda b: b[:5] + [1, 0, 0, 0, 0] + b[10:15] + [1, 1, 0, 0, 0, 1, 0] + b[22:], "not unique"),  # 1, 1, 99
    (lambda b: b[:5] + [0] * 5 + b[10:15] + [1, 1, 0, 0, 0, 1, 0] + b[22:], "not unique and increasing"),  # 1, 0
])
def test_hostile_offsets_are_refused(change, message):
    bits = _bits(ef_encode(torch.tensor([1, 40, 99]), *ONE))
    assert len(bits) == 24
    with pytest.raises(CodecError, match=f"tensor ::idx .*{message}"):
        ef_decode(_from_bits(change(bits)), *ONE, what="::idx")


def test_a_high_part_in_another_chunks_bitvector_is_refused():
    counts, lengths = torch.tensor([1, 1]), torch.tensor([64, 64])  # l = 6: one bucket, 2 high bits a chunk
    assert _bits(ef_encode(torch.tensor([5, 9]), counts, lengths))[12:16] == [1, 0, 1, 0]
    for high in ([1, 1, 0, 0], [0, 0, 1, 1], [0, 1, 1, 0]):
        bits = _bits(ef_encode(torch.tensor([5, 9]), counts, lengths))
        bits[12:16] = high
        with pytest.raises(CodecError, match="high part outside its chunk"):
            ef_decode(_from_bits(bits), counts, lengths, what="::idx")


@pytest.mark.parametrize("data", [torch.zeros(3, dtype=torch.int16), torch.zeros(1, 3, dtype=torch.uint8)])
def test_offsets_of_the_wrong_dtype_or_rank_are_refused(data):
    with pytest.raises(CodecError, match="::idx must be uint8"):
        ef_decode(data, *ONE, what="::idx")


# --- sparse updates --------------------------------------------------------------------------------------


def _update_header(data: bytes) -> dict:
    return json.loads(json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]["agora_update"])


def _payload(data: bytes) -> int:
    return sum(t.numel() * t.element_size() for t in st_load(data).values())


@hypothesis_settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 9000), min_size=1, max_size=4), chunk=st.sampled_from(SPARSE_CHUNKS),
       density=st.sampled_from([0.001, 0.01, 0.02, 0.05, 0.25]), codec=st.sampled_from(["topk2", "topk4"]),
       seed=st.integers(0, 2**16))
def test_ef_and_int16_updates_decode_to_the_same_tensors_in_the_bytes_payload_nbytes_says(sizes, chunk, density,
                                                                                           codec, seed):
    g = torch.Generator().manual_seed(seed)
    delta = {f"t{i}": torch.randn(n, generator=g) for i, n in enumerate(sizes)}
    ref = reference_of(delta)
    ef = encode_update(delta, codec, chunk=chunk, density=density)
    legacy = encode_update(delta, codec, chunk=chunk, density=density, idx="int16")
    assert _update_header(ef)["idx"] == "ef" and "idx" not in _update_header(legacy)
    a, b = decode_update(ef, ref), decode_update(legacy, ref)
    assert all(torch.equal(a[k], b[k]) for k in delta)
    assert _payload(ef) == payload_nbytes(ref, codec, chunk=chunk, density=density)
    assert _payload(legacy) == payload_nbytes(ref, codec, chunk=chunk, density=density, idx="int16")
    # the server bounds uploads by the int16 size: an Elias–Fano update is never larger
    assert _payload(ef) <= _payload(legacy)


@pytest.mark.parametrize("chunk", SPARSE_CHUNKS)
@pytest.mark.parametrize("density", [0.001, 0.005, 0.02, 0.1, 0.25])
def test_int16_offsets_bound_ef_offsets_for_every_allowed_setting(chunk, density):
    # whole chunks and every kind of tail, down to a single element
    ref = {"a": ((chunk * 3 + 1,), torch.float32), "b": ((chunk - 1,), torch.float32), "c": ((7,), torch.float32),
           "d": ((1,), torch.float32)}
    for codec in ("topk2", "topk4"):
        assert payload_nbytes(ref, codec, chunk=chunk, density=density) <= payload_nbytes(
            ref, codec, chunk=chunk, density=density, idx="int16")


# Written by the previous release (int16 offsets, no "idx" key): topk2 at chunk 64, 4 values a chunk, of
# LEGACY_X; and the published step of LEGACY_STEP at chunk 64.
LEGACY_UPDATE = base64.b64decode(
    "KAEAAAAAAAB7Il9fbWV0YWRhdGFfXyI6eyJhZ29yYV91cGRhdGUiOiJ7XCJjaHVua1wiOjY0LFwiY29kZWNcIjpcInRvcGsyXCIsXCJmb3Jt"
    "YXRcIjpcImFnb3JhLXVwZGF0ZS12MVwiLFwidG9wa1wiOjR9In0sIjo6c2NhbGUiOnsiZHR5cGUiOiJGMzIiLCJzaGFwZSI6WzJdLCJkYXRh"
    "X29mZnNldHMiOlswLDhdfSwiOjppZHgiOnsiZHR5cGUiOiJJMTYiLCJzaGFwZSI6WzhdLCJkYXRhX29mZnNldHMiOls4LDI0XX0sIjo6Y29k"
    "ZXMiOnsiZHR5cGUiOiJVOCIsInNoYXBlIjpbMl0sImRhdGFfb2Zmc2V0cyI6WzI0LDI2XX19ICAgICAgIAAAyD4AAMQ+AAAeACkAPAAHAA8A"
    "EgAaAHd3")
LEGACY_STEP = base64.b64decode(
    "GAEAAAAAAAB7Il9fbWV0YWRhdGFfXyI6eyJhZ29yYV9zdGVwIjoie1wiY2h1bmtcIjo2NCxcImZvcm1hdFwiOlwiYWdvcmEtc3RlcC12MVwi"
    "LFwidmFsdWVzXCI6XCJmcDE2XCJ9In0sIjo6Y291bnQiOnsiZHR5cGUiOiJJMzIiLCJzaGFwZSI6WzJdLCJkYXRhX29mZnNldHMiOlswLDhd"
    "fSwiOjp2YWx1ZXMiOnsiZHR5cGUiOiJGMTYiLCJzaGFwZSI6WzEyXSwiZGF0YV9vZmZzZXRzIjpbOCwzMl19LCI6OmlkeCI6eyJkdHlwZSI6"
    "IkkxNiIsInNoYXBlIjpbMTJdLCJkYXRhX29mZnNldHMiOlszMiw1Nl19fSAgCAAAAAQAAABAugC1ADEAOcC3AKRAN0C5ALKANAA6wLUAAAkA"
    "EgAbACQALQA2AD8ACAARABoAIwA=")
LEGACY_X = {"w": torch.tensor([((i * 37) % 101 - 50) / 64 for i in range(100)])}
LEGACY_D = {"w": torch.where(torch.arange(100) % 9 == 0, LEGACY_X["w"], 0.0)}


def test_a_previous_release_update_still_decodes_identically():
    ref = reference_of(LEGACY_X)
    old = decode_update(LEGACY_UPDATE, ref)["w"]
    assert torch.nonzero(old).reshape(-1).tolist() == [0, 30, 41, 60, 71, 79, 82, 90]
    assert torch.equal(decode_update(encode_update(LEGACY_X, "topk2", chunk=64, density=4 / 64, tail="min"), ref)["w"],
                       old)
    assert encode_update(LEGACY_X, "topk2", chunk=64, density=4 / 64, idx="int16", tail="min") == LEGACY_UPDATE


def test_a_previous_release_step_still_decodes_identically():
    assert torch.equal(apply_published_delta({"w": torch.zeros(100)}, LEGACY_STEP)["w"], -LEGACY_D["w"])
    assert encode_published_delta(LEGACY_D, chunk=64, idx="int16") == LEGACY_STEP
    ef = encode_published_delta(LEGACY_D, chunk=64)
    assert _payload(ef) < _payload(LEGACY_STEP)
    assert torch.equal(decode_published_delta(ef, reference_of(LEGACY_D))["w"], LEGACY_D["w"])


def test_ef_update_is_at_least_1_6x_smaller_than_int16_at_2_percent():
    state = init_state("byte-gpt", BYTE_GPT, seed=0)
    assert 100_000 < sum(v.numel() for v in state.values()) < 150_000
    g = torch.Generator().manual_seed(0)
    delta = {k: torch.randn(v.shape, generator=g) * 1e-3 for k, v in state.items()}
    for codec in ("topk2", "topk4"):
        ef, legacy = encode_update(delta, codec), encode_update(delta, codec, idx="int16")
        assert len(legacy) >= (1.6 if codec == "topk2" else 1.45) * len(ef)


def _meta_update(data: bytes, **changes) -> bytes:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    inner = {**json.loads(header["__metadata__"]["agora_update"]), **changes}
    header["__metadata__"]["agora_update"] = json.dumps({k: v for k, v in inner.items() if v is not ...})
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[8 + n :]


@pytest.mark.parametrize("idx", ["int16", "EF", "", 1, None, True])
def test_update_idx_other_than_ef_is_refused(idx):
    x = {"w": torch.randn(300, generator=torch.Generator().manual_seed(0))}
    with pytest.raises(CodecError, match="metadata 'idx' .* is not allowed for codec topk2"):
        decode_update(_meta_update(encode_update(x, "topk2", chunk=64), idx=idx), reference_of(x))


def test_update_idx_is_refused_for_dense_codecs_and_bad_forms_when_encoding():
    x = {"w": torch.randn(300, generator=torch.Generator().manual_seed(0))}
    with pytest.raises(CodecError, match="'idx' 'ef' is not allowed for codec int8"):
        decode_update(_meta_update(encode_update(x, "int8"), idx="ef"), reference_of(x))
    with pytest.raises(CodecError, match="offset form 'int32'"):
        encode_update(x, "topk2", idx="int32")
    with pytest.raises(CodecError, match="offset form"):
        payload_nbytes(reference_of(x), "topk2", idx="int8")


def _ef_update_parts(x, chunk=64, topk=4):
    from diloco.codecs import _encoded_tensors

    return _encoded_tensors(x, "topk2", chunk, topk, "ef", share=False)  # _ef_update writes no "tail"


def _ef_update(parts, chunk=64, topk=4) -> bytes:
    meta = {"chunk": chunk, "codec": "topk2", "format": "agora-update-v1", "idx": "ef", "topk": topk}
    return st_save(parts, metadata={"agora_update": json.dumps(meta)})


def test_ef_update_whose_offsets_are_damaged_is_refused():
    x = {"w": torch.randn(200, generator=torch.Generator().manual_seed(0))}  # chunks 64, 64, 64, 8
    ref = reference_of(x)
    parts = _ef_update_parts(x)
    assert torch.equal(decode_update(_ef_update(parts), ref)["w"], decode_update(encode_update(
        x, "topk2", chunk=64, density=4 / 64, tail="min"), ref)["w"])
    idx = parts["::idx"]
    for bad, message in (
        (idx[:-1], "::idx must be uint8 of shape"),
        (torch.cat([idx, torch.zeros(1, dtype=torch.uint8)]), "::idx must be uint8 of shape"),
        (idx.to(torch.int16), "::idx must be uint8"),
        (torch.zeros_like(idx), "::idx marks 0 high parts"),
        (torch.full_like(idx, 255), "::idx"),
    ):
        with pytest.raises(CodecError, match=message):
            decode_update(_ef_update({**parts, "::idx": bad}), ref)
    # out of range, duplicate and decreasing offsets, written as Elias–Fano would write them
    counts, lengths = torch.tensor([4, 4, 4, 4]), torch.tensor([64, 64, 64, 8])
    good = torch.tensor([1, 2, 3, 4] * 3 + [0, 1, 2, 3])
    for offsets, message in (([1, 2, 3, 4] * 3 + [0, 1, 2, 8], "outside its chunk"),
                             ([1, 2, 3, 4] * 3 + [0, 1, 1, 3], "not unique"),
                             ([1, 2, 3, 4] * 2 + [1, 2, 4, 3] + [0, 1, 2, 3], "not unique and increasing")):
        assert decode_update(_ef_update({**parts, "::idx": ef_encode(good, counts, lengths)}), ref)
        with pytest.raises(CodecError, match=f"::idx .*{message}"):
            decode_update(_ef_update({**parts, "::idx": ef_encode(torch.tensor(offsets), counts, lengths)}), ref)


# --- published steps -------------------------------------------------------------------------------------


def _step_of_four_workers(state, density=0.02, chunk=4096):
    ref = reference_of(state)
    g = torch.Generator().manual_seed(1)
    updates = []
    for _ in range(4):
        delta = {k: torch.randn(v.shape, generator=g) * 1e-3 for k, v in state.items()}
        updates.append(decode_update(encode_update(delta, "topk2", chunk=chunk, density=density), ref))
    return published_delta({k: sum(u[k] for u in updates) / 4 for k in ref})


def _step_meta(data: bytes) -> dict:
    return json.loads(json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]["agora_step"])


def test_published_step_of_four_2_percent_updates_is_smaller_and_rebuilds_bitwise():
    state = init_state("byte-gpt", BYTE_GPT, seed=0)
    step = _step_of_four_workers(state)
    ef, legacy = encode_published_delta(step), encode_published_delta(step, idx="int16")
    assert _step_meta(ef) == {"chunk": 4096, "format": "agora-step-v1", "idx": "ef", "values": "fp16"}
    assert _step_meta(legacy) == {"chunk": 4096, "format": "agora-step-v1", "values": "fp16"}
    assert len(legacy) >= 1.3 * len(ef)
    rebuilt = {k: v - step[k] for k, v in state.items()}
    for data in (ef, legacy):
        assert all(torch.equal(a, rebuilt[k]) for k, a in apply_published_delta(state, data).items())


@hypothesis_settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=4), chunk=st.sampled_from(SPARSE_CHUNKS[:6]),
       density=st.sampled_from([0.0, 0.01, 0.1, 0.4, 0.6, 0.9, 1.0]), seed=st.integers(0, 2**16))
def test_ef_and_int16_steps_decode_to_the_same_step(sizes, chunk, density, seed):
    g = torch.Generator().manual_seed(seed)
    step = {}
    for i, n in enumerate(sizes):
        keep = torch.rand(n, generator=g) < density * torch.rand(1, generator=g) * 2  # densities vary by tensor
        step[f"t{i}"] = torch.where(keep, torch.randn(n, generator=g).half().float(), torch.zeros(n))
    ref = reference_of(step)
    for idx in ("ef", "int16"):
        out = decode_published_delta(encode_published_delta(step, chunk=chunk, idx=idx), ref)
        assert all(torch.equal(out[k], step[k]) for k in step)


def test_a_chunk_goes_dense_when_its_offsets_cost_more_than_its_zeros():
    w = torch.zeros(192)
    for start, nnz in ((0, 6), (64, 38), (128, 61)):
        w[start : start + nnz] = 1.0
    counts = {idx: st_load(encode_published_delta({"w": w}, chunk=64, idx=idx))["::count"].tolist()
              for idx in ("ef", "int16")}
    # l = ⌊log2(64/6)⌋ = 3: 38 offsets cost 38·4 + 8 = 160 bits < 26 zeros · 16; 61 cost 252 > 3 · 16
    assert counts == {"ef": [6, 38, 64], "int16": [6, 64, 64]}


def _damaged_step(change: dict, meta_changes: dict | None = None) -> bytes:
    w = torch.zeros(128)
    w[torch.tensor([1, 5, 70])] = torch.tensor([0.5, -0.25, 2.0])
    data = encode_published_delta({"w": w}, chunk=64, values="fp16")  # int8 values: test_step_values
    parts = st_load(data)
    meta = {**_step_meta(data), **(meta_changes or {})}
    return st_save({**parts, **change}, metadata={"agora_step": json.dumps(meta)})


def test_published_ef_step_is_checked():
    state = {"w": torch.zeros(128)}
    assert apply_published_delta(state, _damaged_step({}))["w"][70].item() == -2.0
    counts, lengths = torch.tensor([2, 1]), torch.tensor([64, 64])
    idx = ef_encode(torch.tensor([1, 5, 6]), counts, lengths)
    for change, message in (
        ({"::idx": idx[:-1]}, "::idx must be uint8 of shape"),
        ({"::idx": torch.cat([idx, torch.zeros(1, dtype=torch.uint8)])}, "::idx must be uint8 of shape"),
        ({"::idx": idx.to(torch.int16)}, "::idx must be uint8"),
        ({"::idx": idx | torch.tensor([0] * (idx.numel() - 1) + [128], dtype=torch.uint8)}, "padding"),
        ({"::idx": ef_encode(torch.tensor([5, 1, 6]), counts, lengths)}, "not unique and increasing"),
        ({"::idx": ef_encode(torch.tensor([5, 5, 6]), counts, lengths)}, "not unique"),
        ({"::count": torch.tensor([2, 65], dtype=torch.int32)}, "count outside"),
        ({"::count": torch.tensor([3, 1], dtype=torch.int32)}, "values, the counts say"),
    ):
        with pytest.raises(CodecError, match=message):
            apply_published_delta(state, _damaged_step(change))
    with pytest.raises(CodecError, match="idx 'int16' must be 'ef'"):
        apply_published_delta(state, _damaged_step({}, {"idx": "int16"}))
    legacy_meta = {"chunk": 64, "format": "agora-step-v1", "values": "fp16"}
    with pytest.raises(CodecError, match="::idx must be a 1-d int16"):  # ef offsets under the int16 metadata
        apply_published_delta(state, st_save(st_load(_damaged_step({})), metadata={
            "agora_step": json.dumps(legacy_meta)}))
