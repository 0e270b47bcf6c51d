import json

import pytest
import torch
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
