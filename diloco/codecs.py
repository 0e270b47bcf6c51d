"""Pseudo-gradient codecs. An update travels as safetensors bytes whose metadata names the codec:
``{"agora_update": '{"chunk":4096,"codec":"int8","format":"agora-update-v1"}'}`` (one key, sorted JSON,
so identical updates encode to identical bytes).

- ``fp32``: the tensors as float32.
- ``fp16``: the tensors as float16 (half the bytes; values beyond ±65504 are refused when encoding).
- ``int8``: each tensor is flattened and cut into chunks of ``chunk`` elements (4096 by default, one of
  ``INT8_CHUNKS``: powers of two from 64 to 65536); a chunk is stored as int8 ``round(127 · x / absmax)``
  (so within ±127) with its float32 ``absmax`` in ``"<name>::scale"``. The error per element is at most
  absmax/254 of its chunk; ~4× fewer bytes than fp32.

Decoding treats the bytes as hostile: the header is bounded in size and nesting (``diloco.safejson``), the
metadata holds only known keys with values from fixed sets, everything is checked against the model's
reference (names, shapes, dtypes) before anything is allocated from it, and the decoded float32 values must
be finite.
"""

from __future__ import annotations

import json
import math

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from diloco import safejson

CODECS = ("fp32", "fp16", "int8")
FORMAT = "agora-update-v1"
META_KEY = "agora_update"
INT8_CHUNK = 4096
INT8_CHUNKS = tuple(2**k for k in range(6, 17))  # 64 ... 65536: the chunk sizes a decoder accepts
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
_HEADER_MAX_DEPTH = 4  # {name: {"shape": [...]}} is 3 levels
_META_MAX_CHARS = 1024
_META_KEYS = {"format", "codec", "chunk"}
# An update's header lists each tensor once (name, dtype, shape, offsets): allow this much per tensor.
_HEADER_BASE = 64 * 1024
_HEADER_PER_TENSOR = 1024
SCALE_SUFFIX = "::scale"
_FP16_MAX = 65504.0


class CodecError(ValueError):
    """An update cannot be encoded or decoded; the message names the problem."""


def reference_of(state: dict[str, Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{name: (shape, dtype)}`` of a state dict: what a decoded update must match."""
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


def _check_codec(codec: str) -> None:
    if codec not in CODECS:
        raise CodecError(f"unknown codec {codec!r} (known: {', '.join(CODECS)})")


def _quantize_int8(x: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    flat = x.reshape(-1)
    n = flat.numel()
    n_chunks = max(1, math.ceil(n / chunk))
    if n_chunks * chunk != n:
        flat = torch.nn.functional.pad(flat, (0, n_chunks * chunk - n))
    blocks = flat.view(n_chunks, chunk)
    absmax = blocks.abs().amax(dim=1)
    inv = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
    q = (blocks * inv[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q.reshape(-1)[:n].reshape(x.shape), absmax


def _dequantize_int8(q: Tensor, absmax: Tensor, chunk: int) -> Tensor:
    n = q.numel()
    n_chunks = absmax.numel()
    flat = q.reshape(-1).to(torch.float32)
    if n_chunks * chunk != n:
        flat = torch.nn.functional.pad(flat, (0, n_chunks * chunk - n))
    out = flat.view(n_chunks, chunk).mul_((absmax / 127.0)[:, None])
    return out.reshape(-1)[:n].reshape(q.shape).contiguous()


def _encoded_tensors(delta: dict[str, Tensor], codec: str, chunk: int) -> dict[str, Tensor]:
    _check_codec(codec)
    out: dict[str, Tensor] = {}
    for name, value in delta.items():
        if SCALE_SUFFIX in name:
            raise CodecError(f"tensor name {name!r} contains the reserved {SCALE_SUFFIX!r}")
        x = value.detach().to("cpu", torch.float32)
        if not torch.isfinite(x).all():
            raise CodecError(f"tensor {name} has non-finite values")
        if codec == "fp32":
            out[name] = x.contiguous()
        elif codec == "fp16":
            if x.numel() and x.abs().max().item() > _FP16_MAX:
                raise CodecError(f"tensor {name} has values beyond the fp16 range; use fp32 or int8")
            out[name] = x.to(torch.float16).contiguous()
        else:
            q, absmax = _quantize_int8(x, chunk)
            out[name] = q.contiguous()
            out[name + SCALE_SUFFIX] = absmax.contiguous()
    return out


def _check_chunk(chunk) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk not in INT8_CHUNKS:
        raise CodecError(f"int8 chunk {str(chunk)[:20]!r} is not an allowed size (a power of two from "
                         f"{INT8_CHUNKS[0]} to {INT8_CHUNKS[-1]})")
    return chunk


def encode_update(delta: dict[str, Tensor], codec: str, *, chunk: int = INT8_CHUNK) -> bytes:
    """Encode a pseudo-gradient as safetensors bytes with ``{"format", "codec", "chunk"}`` metadata."""
    _check_chunk(chunk)
    tensors = _encoded_tensors(delta, codec, chunk)
    meta = {"format": FORMAT, "codec": codec}
    if codec == "int8":
        meta["chunk"] = chunk
    # One metadata key holding sorted JSON: safetensors writes its metadata map in arbitrary order, and
    # identical updates should be identical bytes.
    return st_save(tensors, metadata={META_KEY: json.dumps(meta, sort_keys=True, separators=(",", ":"))})


def payload_nbytes(reference: dict[str, tuple[tuple[int, ...], torch.dtype]], codec: str,
                   *, chunk: int = INT8_CHUNK) -> int:
    """Bytes of tensor data an encoded update carries (without the small safetensors header)."""
    _check_codec(codec)
    _check_chunk(chunk)
    total = 0
    for shape, _dtype in reference.values():
        n = math.prod(shape)
        if codec == "fp32":
            total += 4 * n
        elif codec == "fp16":
            total += 2 * n
        else:
            total += n + 4 * max(1, math.ceil(n / chunk))
    return total


def _read_header(data: bytes, *, max_bytes: int | None = None) -> dict:
    max_bytes = MAX_HEADER_BYTES if max_bytes is None else min(max_bytes, MAX_HEADER_BYTES)
    if len(data) < 8:
        raise CodecError("update is not a safetensors file: too short")
    header_len = int.from_bytes(data[:8], "little")
    if header_len <= 0 or 8 + header_len > len(data):
        raise CodecError("update is not a safetensors file: bad header length")
    if header_len > max_bytes:
        raise CodecError(f"update header is {header_len} bytes, beyond the limit of {max_bytes}")
    try:
        header = safejson.loads(data[8 : 8 + header_len], max_depth=_HEADER_MAX_DEPTH, what="header")
    except safejson.JsonRefused as exc:
        raise CodecError(f"update is not a safetensors file: {exc}") from None
    except ValueError as exc:
        raise CodecError("update is not a safetensors file: header is not JSON") from exc
    if not isinstance(header, dict):
        raise CodecError("update is not a safetensors file: header is not an object")
    return header


def _metadata_of(header: dict) -> dict[str, str]:
    meta = header.get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def _read_metadata(data: bytes) -> dict[str, str]:
    return _metadata_of(_read_header(data))


def _update_metadata(header: dict) -> dict:
    raw = _metadata_of(header).get(META_KEY)
    if isinstance(raw, str) and len(raw) > _META_MAX_CHARS:
        raise CodecError(f"update metadata {META_KEY!r} is longer than {_META_MAX_CHARS} characters")
    try:
        meta = safejson.loads(raw, max_depth=1, what=META_KEY) if isinstance(raw, str) else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise CodecError(f"update metadata lacks a valid {META_KEY!r} entry (format {FORMAT!r} expected)")
    unknown = sorted(set(meta) - _META_KEYS)
    if unknown:
        raise CodecError(f"update metadata has unknown key(s): {', '.join(k[:40] for k in unknown[:5])}")
    return meta


def decode_update(
    data: bytes, reference: dict[str, tuple[tuple[int, ...], torch.dtype]]
) -> dict[str, Tensor]:
    """Decode and validate an update against the model's ``reference``; float32 tensors out."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CodecError("update must be bytes")
    data = bytes(data)
    # The header first, bounded by what an update of this model needs, and checked against the reference
    # before safetensors allocates anything it declares.
    header = _read_header(data, max_bytes=_HEADER_BASE + _HEADER_PER_TENSOR * 2 * len(reference))
    meta = _update_metadata(header)
    if meta.get("format") != FORMAT:
        raise CodecError(f"update metadata format is {str(meta.get('format'))[:40]!r}, expected {FORMAT!r}")
    codec = meta.get("codec")
    if codec not in CODECS:
        raise CodecError(f"unknown codec {str(codec)[:20]!r} in update metadata (known: {', '.join(CODECS)})")
    chunk = _check_chunk(meta.get("chunk")) if codec == "int8" else INT8_CHUNK
    expected_names = set(reference)
    if codec == "int8":
        expected_names |= {n + SCALE_SUFFIX for n in reference}
    declared = set(header) - {"__metadata__"}
    missing = sorted(expected_names - declared)
    extra = sorted(declared - expected_names)
    if missing:
        raise CodecError(f"update is missing tensor(s): {', '.join(missing[:5])}")
    if extra:
        raise CodecError(f"update has unexpected tensor(s): {', '.join(n[:80] for n in extra[:5])}")
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types for every malformed input
        raise CodecError(f"update is not a safetensors file: {exc}") from exc
    stored_dtype = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}[codec]
    out: dict[str, Tensor] = {}
    for name, (shape, ref_dtype) in reference.items():
        if not ref_dtype.is_floating_point:
            raise CodecError(f"model tensor {name} is {ref_dtype}, updates are only defined for floating point")
        t = tensors[name]
        if tuple(t.shape) != tuple(shape):
            raise CodecError(f"tensor {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if t.dtype != stored_dtype:
            raise CodecError(f"tensor {name} has dtype {t.dtype}, expected {stored_dtype} for codec {codec}")
        if codec == "int8":
            scale = tensors[name + SCALE_SUFFIX]
            n_chunks = max(1, math.ceil(math.prod(shape) / chunk))
            if scale.dtype != torch.float32 or tuple(scale.shape) != (n_chunks,):
                raise CodecError(f"scale of {name} must be float32 of shape ({n_chunks},), "
                                 f"got {scale.dtype} {tuple(scale.shape)}")
            if not torch.isfinite(scale).all():
                raise CodecError(f"tensor {name} has non-finite values (scale)")
            if (scale < 0).any():
                raise CodecError(f"scale of {name} is negative")
            if (t == -128).any():
                raise CodecError(f"tensor {name} has int8 values outside ±127")
            out[name] = _dequantize_int8(t, scale, chunk)
            if not torch.isfinite(out[name]).all():
                raise CodecError(f"tensor {name} has non-finite values after decoding (scale too large)")
        else:
            if not torch.isfinite(t).all():
                raise CodecError(f"tensor {name} has non-finite values")
            out[name] = t.to(torch.float32).contiguous()
    return out
