import json

import pytest
import torch
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from diloco.codecs import CodecError, decode_update, encode_update, payload_nbytes, reference_of
from diloco.models import init_state


@pytest.fixture
def delta(tiny_config):
    state = init_state("byte-gpt", tiny_config, seed=0)
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(v.shape, generator=g) * 1e-3 for k, v in state.items()}


@pytest.fixture
def ref(delta):
    return reference_of(delta)


def _meta(**meta) -> dict:
    return {"agora_update": json.dumps(meta)}


def _rewrite_metadata(data: bytes, **changes) -> bytes:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    inner = json.loads(header["__metadata__"]["agora_update"])
    inner.update(changes)
    header["__metadata__"]["agora_update"] = json.dumps(inner)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[8 + n :]


def test_fp32_exact_and_deterministic_bytes(delta, ref):
    assert all(encode_update(delta, c) == encode_update(delta, c) for c in ("fp32", "fp16", "int8"))
    out = decode_update(encode_update(delta, "fp32"), ref)
    assert all(torch.equal(out[k], delta[k]) for k in delta)


def test_fp16_close_and_half_size(delta, ref):
    data = encode_update(delta, "fp16")
    out = decode_update(data, ref)
    for k in delta:
        assert out[k].dtype == torch.float32
        assert torch.allclose(out[k], delta[k], rtol=1e-3, atol=1e-7)
    assert len(data) < 0.52 * len(encode_update(delta, "fp32"))


def test_int8_within_chunk_absmax_over_127(delta, ref):
    chunk = 256
    data = encode_update(delta, "int8", chunk=chunk)
    out = decode_update(data, ref)
    for k, x in delta.items():
        flat, got = x.reshape(-1), out[k].reshape(-1)
        for s in range(0, flat.numel(), chunk):
            bound = flat[s : s + chunk].abs().max() / 127
            assert (got[s : s + chunk] - flat[s : s + chunk]).abs().max() <= bound + 1e-12
    assert len(data) < 0.3 * len(encode_update(delta, "fp32"))


def test_int8_zero_and_odd_sizes():
    delta = {"z": torch.zeros(10), "odd": torch.linspace(-1, 1, 4097), "s": torch.tensor(3.0)}
    out = decode_update(encode_update(delta, "int8"), reference_of(delta))
    assert torch.equal(out["z"], torch.zeros(10))
    assert (out["odd"] - delta["odd"]).abs().max() <= 1 / 127
    assert out["s"].item() == pytest.approx(3.0)


def test_payload_nbytes_matches_encoding(delta, ref):
    for codec in ("fp32", "fp16", "int8"):
        data = encode_update(delta, codec)
        assert payload_nbytes(ref, codec) <= len(data) < payload_nbytes(ref, codec) + 4096
    for codec in SPARSE:
        for idx in ("ef", "int16"):
            data = encode_update(delta, codec, idx=idx)
            assert payload_nbytes(ref, codec, idx=idx) <= len(data) < payload_nbytes(ref, codec, idx=idx) + 1024


def test_reject_not_safetensors(ref):
    for data in (b"", b"hello world, not a tensor file", b"\xff" * 64):
        with pytest.raises(CodecError, match="not a safetensors file"):
            decode_update(data, ref)


def test_reject_unknown_codec(delta, ref):
    data = _rewrite_metadata(encode_update(delta, "fp32"), codec="int4")
    with pytest.raises(CodecError, match="unknown codec 'int4'"):
        decode_update(data, ref)
    with pytest.raises(CodecError, match="unknown codec"):
        encode_update(delta, "bf8")


def test_reject_foreign_safetensors(delta, ref):
    with pytest.raises(CodecError, match="update metadata lacks"):
        decode_update(st_save(delta), ref)
    with pytest.raises(CodecError, match="metadata format"):
        decode_update(st_save(delta, metadata=_meta(format="other", codec="fp32")), ref)


def test_reject_missing_and_extra(delta, ref):
    name = next(iter(delta))
    fewer = {k: v for k, v in delta.items() if k != name}
    with pytest.raises(CodecError, match=f"missing tensor.*{name}"):
        decode_update(encode_update(fewer, "fp16"), ref)
    more = {**delta, "evil.weight": torch.zeros(3)}
    with pytest.raises(CodecError, match="unexpected tensor.*evil.weight"):
        decode_update(encode_update(more, "int8"), ref)


def test_reject_wrong_shape(delta, ref):
    name = "wte.weight"
    bad = {**delta, name: torch.zeros(3, 3)}
    with pytest.raises(CodecError, match=f"{name} has shape \\(3, 3\\)"):
        decode_update(encode_update(bad, "fp32"), ref)


def test_reject_wrong_dtype(delta, ref):
    raw = {k: v.to(torch.float64) for k, v in delta.items()}
    data = st_save(raw, metadata=_meta(format="agora-update-v1", codec="fp32"))
    with pytest.raises(CodecError, match="dtype torch.float64, expected torch.float32"):
        decode_update(data, ref)


def test_reject_non_finite(delta, ref):
    name = "wte.weight"
    bad = dict(delta)
    bad[name] = delta[name].clone()
    bad[name][0, 0] = float("nan")
    with pytest.raises(CodecError, match="non-finite"):
        encode_update(bad, "fp32")
    data = st_save(bad, metadata=_meta(format="agora-update-v1", codec="fp32"))
    with pytest.raises(CodecError, match=f"{name} has non-finite"):
        decode_update(data, ref)
    half = {k: v.half() for k, v in bad.items()}
    half[name][0, 1] = float("inf")
    data = st_save(half, metadata=_meta(format="agora-update-v1", codec="fp16"))
    with pytest.raises(CodecError, match="non-finite"):
        decode_update(data, ref)


def test_reject_int8_bad_scale(delta, ref):
    from diloco.codecs import SCALE_SUFFIX, _encoded_tensors

    tensors = _encoded_tensors(delta, "int8", 4096)
    name = "wte.weight"
    tensors[name + SCALE_SUFFIX] = torch.full_like(tensors[name + SCALE_SUFFIX], float("inf"))
    data = st_save(tensors, metadata=_meta(format="agora-update-v1", codec="int8", chunk=4096))
    with pytest.raises(CodecError, match="non-finite"):
        decode_update(data, ref)
    tensors[name + SCALE_SUFFIX] = torch.ones(99)
    data = st_save(tensors, metadata=_meta(format="agora-update-v1", codec="int8", chunk=4096))
    with pytest.raises(CodecError, match="scale of wte.weight"):
        decode_update(data, ref)
    data = _rewrite_metadata(encode_update(delta, "int8"), chunk="zero")
    with pytest.raises(CodecError, match="chunk"):
        decode_update(data, ref)


def test_fp16_overflow_refused():
    with pytest.raises(CodecError, match="fp16 range"):
        encode_update({"a": torch.tensor([1e6])}, "fp16")


# --- hostile metadata and values -------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [0, 1, 3, 100, 32, 2**17, 2**26, 2**40, 2**70, -4096, True, 4096.0, "4096", None])
def test_int8_chunk_outside_the_allowed_sizes_is_refused(delta, ref, chunk):
    data = _rewrite_metadata(encode_update(delta, "int8"), chunk=chunk)
    with pytest.raises(CodecError, match="int8 chunk .* not an allowed size"):
        decode_update(data, ref)
    if isinstance(chunk, int) and not isinstance(chunk, bool):
        with pytest.raises(CodecError, match="not an allowed size"):
            encode_update(delta, "int8", chunk=chunk)


@pytest.mark.parametrize("chunk", [64, 65536])
def test_int8_allowed_chunk_sizes_round_trip(delta, ref, chunk):
    out = decode_update(encode_update(delta, "int8", chunk=chunk), ref)
    for k, x in delta.items():
        assert (out[k] - x).abs().max() <= x.abs().max() / 127 + 1e-12


def _int8_update(values: torch.Tensor, scale: float) -> bytes:
    tensors = {"w": values.to(torch.int8), "w::scale": torch.tensor([scale], dtype=torch.float32)}
    return st_save(tensors, metadata=_meta(format="agora-update-v1", codec="int8", chunk=4096))


def test_int8_value_beyond_127_is_refused_instead_of_decoding_to_infinity():
    ref = {"w": ((4,), torch.float32)}
    data = _int8_update(torch.tensor([-128, 0, 1, 127]), 3.4e38)
    with pytest.raises(CodecError, match="outside ±127"):
        decode_update(data, ref)


def test_int8_largest_scale_decodes_finite_or_is_refused():
    ref = {"w": ((2,), torch.float32)}
    largest = float(torch.finfo(torch.float32).max)
    try:
        out = decode_update(_int8_update(torch.tensor([127, -127]), largest), ref)
    except CodecError as exc:
        assert "non-finite" in str(exc)
    else:
        assert torch.isfinite(out["w"]).all()


@hypothesis_settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.integers(-128, 127), min_size=1, max_size=8),
    scale=st.floats(min_value=0, max_value=float(torch.finfo(torch.float32).max), width=32),
)
def test_int8_decoded_values_are_always_finite(values, scale):
    ref = {"w": ((len(values),), torch.float32)}
    try:
        out = decode_update(_int8_update(torch.tensor(values), scale), ref)
    except CodecError:
        return
    assert torch.isfinite(out["w"]).all()


def _with_header(header: bytes, body: bytes = b"") -> bytes:
    return len(header).to_bytes(8, "little") + header + body


def test_deeply_nested_header_is_a_codec_error_not_a_crash(ref):
    for depth in (10, 20_000):  # 20,000 levels: RecursionError in json.loads before
        header = b'{"__metadata__":{},"x":' + b"[" * depth + b"]" * depth + b"}"
        with pytest.raises(CodecError, match="nested deeper than"):
            decode_update(_with_header(header), ref)


def test_nested_or_oversized_update_metadata_is_refused(delta, ref):
    data = encode_update(delta, "fp32")
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    for value, message in (
        ("[" * 2_000, "longer than 1024"),
        ("x" * 200_000, "header is .* bytes, beyond the limit"),
        ("[" * 500 + "]" * 500, "lacks a valid"),
        ('{"format":"agora-update-v1","codec":"fp32","x":{"y":1}}', "lacks a valid"),
        ('{"format":"agora-update-v1","codec":"fp32","extra":1}', "unknown key.*extra"),
    ):
        header["__metadata__"]["agora_update"] = value
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with pytest.raises(CodecError, match=message):
            decode_update(len(raw).to_bytes(8, "little") + raw + data[8 + n :], ref)


def test_header_size_is_bounded(monkeypatch, delta, ref):
    import diloco.codecs as codecs

    data = encode_update(delta, "fp32")
    monkeypatch.setattr(codecs, "MAX_HEADER_BYTES", 64)
    with pytest.raises(CodecError, match="beyond the limit of 64"):
        decode_update(data, ref)


def test_header_beyond_what_the_model_needs_is_refused_before_loading(ref):
    # A header declaring many tensors is refused by its size alone, before safetensors would create them.
    entries = ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(20_000))
    header = ('{"__metadata__":{"agora_update":"{\\"codec\\":\\"fp32\\",\\"format\\":\\"agora-update-v1\\"}"},'
              + entries + "}").encode()
    with pytest.raises(CodecError, match="update header is .* bytes, beyond the limit"):
        decode_update(_with_header(header), ref)


def test_undeclared_and_missing_tensors_are_named_from_the_header(delta, ref):
    name = next(iter(delta))
    data = encode_update({**{k: v for k, v in delta.items() if k != name}, "evil": torch.zeros(1)}, "fp32")
    with pytest.raises(CodecError, match=f"missing tensor.*{name}"):
        decode_update(data, ref)


# --- sparse codecs: top-k per chunk, 2 or 4 bits -----------------------------------------------------------

SPARSE = ("topk2", "topk4")


def _sparse_file(tensors: dict, codec="topk2", chunk=64, topk=4) -> bytes:
    return st_save(tensors, metadata=_meta(format="agora-update-v1", codec=codec, chunk=chunk, topk=topk))


def _sparse_parts(delta, codec="topk2", chunk=64, topk=4, idx="int16") -> dict:
    """The tensors of a sparse update; int16 offsets by default and short chunks keeping min(topk, length),
    as ``_sparse_file`` writes neither ``"idx"`` nor ``"tail"``."""
    from diloco.codecs import _encoded_tensors

    return _encoded_tensors(delta, codec, chunk, topk, idx, share=False)


@pytest.mark.parametrize("codec,levels", [("topk2", 2), ("topk4", 8)])
def test_sparse_keeps_the_largest_values_per_chunk_with_their_signs(delta, ref, codec, levels):
    chunk, density = 256, 0.03
    topk = round(density * chunk)
    out = decode_update(encode_update(delta, codec, chunk=chunk, density=density), ref)
    for k, x in delta.items():
        flat, got = x.reshape(-1), out[k].reshape(-1)
        for s in range(0, flat.numel(), chunk):
            block, dec = flat[s : s + chunk], got[s : s + chunk]
            kept = dec != 0
            # a short chunk keeps the same share as a full one (at least one value)
            assert int(kept.sum()) == (topk if block.numel() == chunk else max(1, round(topk * block.numel() / chunk)))
            # the kept positions are the largest magnitudes of the chunk
            if (~kept).any():
                assert block[kept].abs().min() >= block[~kept].abs().max()
            assert torch.equal(torch.sign(dec[kept]), torch.sign(block[kept]))
            scale = block[kept].abs().max() / levels
            assert (dec[kept] - block[kept]).abs().max() <= scale * (1 + 1e-6)


def test_sparse_update_is_small_deterministic_and_sized_by_payload_nbytes(delta, ref):
    fp32 = len(encode_update(delta, "fp32"))
    for codec in SPARSE:
        data = encode_update(delta, codec)
        assert data == encode_update(delta, codec)
        assert payload_nbytes(ref, codec) <= len(data) < payload_nbytes(ref, codec) + 1024
        assert payload_nbytes(ref, codec, density=0.01) < payload_nbytes(ref, codec, density=0.03)
    assert len(encode_update(delta, "topk2")) < fp32 / 8  # the tiny model's small tensors are kept whole


def test_sparse_density_is_the_share_kept_in_every_full_chunk():
    x = {"w": torch.randn(8 * 4096, generator=torch.Generator().manual_seed(3))}
    for density in (0.01, 0.02, 0.03):
        out = decode_update(encode_update(x, "topk2", density=density), reference_of(x))["w"]
        assert (out.view(8, 4096) != 0).sum(dim=1).tolist() == [round(density * 4096)] * 8


def test_sparse_zero_tensor_and_short_tail_chunk():
    x = {"z": torch.zeros(100), "tail": torch.arange(1.0, 70.0), "s": torch.tensor(-2.0)}
    out = decode_update(encode_update(x, "topk4", chunk=64, density=0.25), reference_of(x))
    assert torch.equal(out["z"], torch.zeros(100))
    assert out["s"].item() == -2.0
    # 69 elements: a full chunk of 64 keeps 16, the tail of 5 the same quarter: round(16 · 5 / 64) = 1
    assert int((out["tail"] != 0).sum()) == 16 + 1
    assert out["tail"][68] > 0 and not out["tail"][64:68].any()
    assert (out["tail"][48:64] > 0).all() and not out["tail"][:48].any()
    # agents before the share rule kept min(topk, length): all 5 (and such updates still decode)
    legacy = decode_update(encode_update(x, "topk4", chunk=64, density=0.25, tail="min"), reference_of(x))
    assert int((legacy["tail"] != 0).sum()) == 16 + 5 and (legacy["tail"][64:] > 0).all()


def test_density_is_the_share_sent_of_short_tensors_too():
    g = torch.Generator().manual_seed(0)
    x = {"big": torch.randn(3 * 4096, generator=g), "small": torch.randn(1000, generator=g),
         "bias": torch.randn(64, generator=g)}
    for chunk in (4096, 32768):
        out = decode_update(encode_update(x, "topk2", chunk=chunk, density=0.02), reference_of(x))
        sent = {k: int((v != 0).sum()) for k, v in out.items()}
        assert sent["small"] == 20 and sent["bias"] == 1  # 2% of 1000; at least one
        assert sent["big"] == (3 * 82 if chunk == 4096 else round(0.02 * 32768 * 3 * 4096 / 32768))
        old = decode_update(encode_update(x, "topk2", chunk=chunk, density=0.02, tail="min"), reference_of(x))
        assert int((old["bias"] != 0).sum()) == 64  # the rule before: a small tensor went whole
    with pytest.raises(CodecError, match="short-chunk rule 'all'"):
        encode_update(x, "topk2", tail="all")
    data = encode_update(x, "topk2")
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    meta = json.loads(header["__metadata__"]["agora_update"])
    assert meta["tail"] == "share"


@pytest.mark.parametrize("density", [0, 0.0005, 0.3, 1, -0.02, float("nan"), "0.02", True, None])
def test_sparse_density_outside_the_allowed_range_is_refused(delta, density):
    with pytest.raises(CodecError, match="density"):
        encode_update(delta, "topk2", density=density)


@pytest.mark.parametrize("chunk", [32, 100, 65536])
def test_sparse_chunk_outside_the_allowed_sizes_is_refused(delta, ref, chunk):
    with pytest.raises(CodecError, match="sparse chunk .* not an allowed size"):
        encode_update(delta, "topk2", chunk=chunk)
    data = _rewrite_metadata(encode_update(delta, "topk2"), chunk=chunk)
    with pytest.raises(CodecError, match="sparse chunk .* not an allowed size"):
        decode_update(data, ref)


@pytest.mark.parametrize("topk", [0, -1, 17, 10**9, 2.0, "4", None, True])
def test_sparse_topk_outside_the_chunk_is_refused(delta, ref, topk):
    data = _rewrite_metadata(encode_update(delta, "topk2", chunk=64, density=0.0625), topk=topk)
    with pytest.raises(CodecError, match="topk"):
        decode_update(data, ref)


def test_sparse_topk_that_disagrees_with_the_payload_is_refused(delta, ref):
    data = _rewrite_metadata(encode_update(delta, "topk2", chunk=64, density=0.0625), topk=3)
    with pytest.raises(CodecError, match="must be .* of shape"):
        decode_update(data, ref)


def _one(values=(0.5, -1.0, 2.0, 0.25), n=64):
    x = torch.zeros(n)
    x[torch.tensor([3, 10, 20, 40])] = torch.tensor(values)
    return {"w": x}


@pytest.mark.parametrize("offsets,message", [
    ([3, 10, 20, 64], "outside its chunk"),
    ([-1, 10, 20, 40], "outside its chunk"),
    ([3, 10, 10, 40], "not unique"),
    ([10, 3, 20, 40], "not unique and increasing"),
])
def test_sparse_hostile_indices_are_refused(offsets, message):
    x = _one()
    parts = _sparse_parts(x)
    parts["::idx"] = torch.tensor(offsets, dtype=torch.int16)
    with pytest.raises(CodecError, match=message):
        decode_update(_sparse_file(parts), reference_of(x))


def test_sparse_round_trip_of_a_hand_built_update():
    x = _one()
    out = decode_update(_sparse_file(_sparse_parts(x)), reference_of(x))["w"]
    # scale = 2 / 2 = 1: 0.5 → +1 (level 1 at least), -1 → -1, 2 → +2, 0.25 → +1
    assert out[torch.tensor([3, 10, 20, 40])].tolist() == [1.0, -1.0, 2.0, 1.0]
    assert int((out != 0).sum()) == 4


@pytest.mark.parametrize("scale,message", [(float("inf"), "non-finite"), (float("nan"), "non-finite"),
                                           (-1.0, "negative"), (3.0e38, "non-finite values after decoding")])
def test_sparse_hostile_scales_are_refused(scale, message):
    x = _one()
    parts = _sparse_parts(x)
    parts["::scale"] = torch.tensor([scale])
    with pytest.raises(CodecError, match=message):
        decode_update(_sparse_file(parts), reference_of(x))


def test_sparse_nonzero_padding_bits_and_wrong_dtypes_are_refused():
    x = {"w": torch.arange(1.0, 65.0)}  # 64 values, topk 3: 6 bits of codes in one byte, 2 padding bits
    parts = _sparse_parts(x, topk=3)
    ref = reference_of(x)
    bad = dict(parts, **{"::codes": parts["::codes"] | 0b11000000})
    with pytest.raises(CodecError, match="padding bits"):
        decode_update(_sparse_file(bad, topk=3), ref)
    bad = dict(parts, **{"::idx": parts["::idx"].to(torch.int32)})
    with pytest.raises(CodecError, match="::idx must be torch.int16"):
        decode_update(_sparse_file(bad, topk=3), ref)
    bad = dict(parts, **{"::scale": parts["::scale"].double()})
    with pytest.raises(CodecError, match="::scale must be torch.float32"):
        decode_update(_sparse_file(bad, topk=3), ref)


def test_sparse_update_with_per_tensor_entries_is_refused(delta, ref):
    parts = _sparse_parts(delta, chunk=4096, topk=82)
    with pytest.raises(CodecError, match="unexpected tensor"):
        decode_update(_sparse_file({**parts, "wte.weight": torch.zeros(3)}, chunk=4096, topk=82), ref)
    del parts["::idx"]
    with pytest.raises(CodecError, match="missing tensor.*::idx"):
        decode_update(_sparse_file(parts, chunk=4096, topk=82), ref)
    with pytest.raises(CodecError, match="reserved"):
        encode_update({"a::idx": torch.zeros(3)}, "topk2")


def test_topk_key_is_refused_for_dense_codecs(delta, ref):
    with pytest.raises(CodecError, match="'topk'"):
        decode_update(_rewrite_metadata(encode_update(delta, "int8"), topk=4), ref)


@hypothesis_settings(max_examples=60, deadline=None)
@given(codes=st.binary(min_size=2, max_size=2), offsets=st.lists(st.integers(-40000, 40000), min_size=8, max_size=8),
       scales=st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=2, max_size=2))
def test_sparse_decoding_any_payload_is_finite_and_at_most_topk_per_chunk_or_refused(codes, offsets, scales):
    ref = {"w": ((128,), torch.float32)}
    parts = {"::codes": torch.tensor(list(codes), dtype=torch.uint8),
             "::idx": torch.tensor(offsets, dtype=torch.int32).clamp(-32768, 32767).to(torch.int16),
             "::scale": torch.tensor(scales, dtype=torch.float32)}
    try:
        out = decode_update(_sparse_file(parts, chunk=64, topk=4), ref)["w"]
    except CodecError:
        return
    assert torch.isfinite(out).all()
    assert ((out.view(2, 64) != 0).sum(dim=1) <= 4).all()
