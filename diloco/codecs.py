"""Pseudo-gradient codecs. An update travels as safetensors bytes whose metadata names the codec:
``{"agora_update": '{"chunk":4096,"codec":"int8","format":"agora-update-v1"}'}`` (one key, sorted JSON,
so identical updates encode to identical bytes).

- ``fp32``: the tensors as float32.
- ``fp16``: the tensors as float16 (half the bytes; values beyond ±65504 are refused when encoding).
- ``int8``: each tensor is flattened and cut into chunks of ``chunk`` elements (4096 by default, one of
  ``INT8_CHUNKS``: powers of two from 64 to 65536); a chunk is stored as int8 ``round(127 · x / absmax)``
  (so within ±127) with its float32 ``absmax`` in ``"<name>::scale"``. The error per element is at most
  absmax/254 of its chunk; ~4× fewer bytes than fp32.
- ``topk2`` / ``topk4`` (sparse, SparseLoCo-style): each tensor is flattened and cut into chunks of ``chunk``
  elements (4096 by default, one of ``SPARSE_CHUNKS``: powers of two from 64 to 32768); in every chunk only
  the ``topk`` largest-magnitude values are kept (``topk = round(density · chunk)``, density 2% by default).
  A chunk shorter than ``chunk`` (a tensor's last, or a whole small tensor) keeps the same share,
  ``round(topk · length / chunk)`` and at least one (metadata ``"tail": "share"``); without that key (agents
  before it) it keeps ``min(topk, length)`` (:func:`tail_kept`). A kept value is stored in 2 (or 4) bits as a sign
  and a magnitude level m in 1..L (L = 2 or 8), decoding to ``± m · scale`` with its chunk's float32
  ``scale = absmax / L``; every value not kept decodes to 0. The whole model travels as three tensors,
  model tensors in sorted name order, chunk after chunk: ``"::codes"`` (uint8, 4 or 2 codes per byte,
  first code in the low bits, padding bits zero), ``"::idx"`` (the offsets of the kept values inside their
  chunk, strictly increasing within a chunk) and ``"::scale"`` (float32, one per chunk); metadata adds
  ``"topk"`` and ``"idx": "ef"``: ``"::idx"`` is uint8, the offsets in Elias–Fano form (below; the counts
  per chunk are fixed by the layout: ``topk``, or :func:`tail_kept` for a short chunk). Without ``"idx"``
  (agents before it), ``"::idx"`` is int16, one offset each. At 2% density a topk2 update is ~0.2 bits per
  parameter (~0.37 with int16 offsets), ~160× fewer bytes than fp32.
  Workers keep what was not sent in an error-feedback buffer (``diloco.sparse.ErrorFeedback``) and
  send it in later rounds.

Elias–Fano offsets (:func:`ef_encode`, also used by ``diloco.sparse`` for published steps). Given per
chunk the number of offsets n_c and the chunk's length u_c (both known to the decoder), let N = Σ n_c,
U = Σ u_c over the chunks with n_c > 0, and l = ⌊log2(U / N)⌋ (0 when N = 0). An offset x is split into its
low part x mod 2^l and its high part h = x >> l. The uint8 tensor is a bit string, bit i of byte j being bit
8j + i of the string: first the N low parts, l bits each, least significant first, in stream order; then,
for every chunk with n_c > 0 in order, n_c + b_c bits with b_c = ⌈u_c / 2^l⌉: the k-th offset of the chunk
(k from 0) sets bit h_k + k, the others are zero (unary-coded gaps of the high parts); then zero bits up to
a whole byte. Chunks with n_c = 0 take no bits. That is about 2 + log2(u/n) bits an offset instead of 16.
The encoding is canonical: the decoder refuses a length other than the exact one for the counts, non-zero
padding, a high part beyond its chunk's b_c buckets, an offset ≥ u_c, and offsets not strictly increasing
within a chunk (Elias–Fano alone only orders the high parts).

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

SPARSE_BITS = {"topk2": 2, "topk4": 4}
CODECS = ("fp32", "fp16", "int8", *SPARSE_BITS)
DENSITY = 0.02  # default share of each chunk a sparse codec keeps (SparseLoCo: 1–3%)
MIN_DENSITY, MAX_DENSITY = 0.001, 0.25
FORMAT = "agora-update-v1"
META_KEY = "agora_update"
INT8_CHUNK = 4096
INT8_CHUNKS = tuple(2**k for k in range(6, 17))  # 64 ... 65536: the chunk sizes a decoder accepts
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
_HEADER_MAX_DEPTH = 4  # {name: {"shape": [...]}} is 3 levels
_META_MAX_CHARS = 1024
SPARSE_CHUNKS = tuple(2**k for k in range(6, 16))  # 64 ... 32768: chunk offsets fit int16
_META_KEYS = {"format", "codec", "chunk", "topk", "idx", "tail"}
TAILS = ("share", "min")
# How a sparse update's offsets travel: "ef" (Elias–Fano, metadata "idx": "ef") or "int16" (no "idx" key:
# the form agents wrote before Elias–Fano, still accepted).
IDX_FORMS = ("ef", "int16")
# An update's header lists each tensor once (name, dtype, shape, offsets): allow this much per tensor.
_HEADER_BASE = 64 * 1024
_HEADER_PER_TENSOR = 1024
SCALE_SUFFIX = "::scale"
# The three tensors of a sparse update (see the module doc): names no model tensor has (they contain "::").
SPARSE_CODES, SPARSE_IDX, SPARSE_SCALE = "::codes", "::idx", "::scale"
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


def topk_per_chunk(chunk: int, density: float) -> int:
    """Values a sparse codec keeps per chunk of ``chunk`` elements at ``density``."""
    return max(1, min(chunk, round(density * chunk)))


def tail_kept(rest: int, chunk: int, topk: int, share: bool) -> int:
    """Values kept in a chunk of ``rest`` < ``chunk`` elements (a tensor's last chunk, or a whole tensor
    shorter than a chunk). ``share`` (metadata ``"tail": "share"``): the same share as a full chunk,
    ``round(topk · rest / chunk)`` (halves up, at least 1): what ``density`` promises. Without it (agents
    before it): ``min(topk, rest)``, which sends every value of a tensor shorter than ``topk`` and more than
    ``density`` of any tensor shorter than a chunk."""
    if rest <= 0:
        return 0
    if share:
        return max(1, min(rest, (2 * topk * rest + chunk) // (2 * chunk)))
    return min(topk, rest)


def _chunk_counts(n: int, chunk: int, topk: int, share: bool = True) -> tuple[int, int, int]:
    """``(full chunks, elements in the last partial chunk, values kept in all)`` of an n-element tensor."""
    full, rest = divmod(n, chunk)
    return full, rest, full * min(topk, chunk) + tail_kept(rest, chunk, topk, share)


def _pack(codes: Tensor, bits: int) -> Tensor:
    per = 8 // bits
    pad = -codes.numel() % per
    c = torch.nn.functional.pad(codes.to(torch.uint8), (0, pad)).view(-1, per)
    out = torch.zeros(c.shape[0], dtype=torch.uint8)
    for j in range(per):
        out |= c[:, j] << (bits * j)
    return out


def _unpack(packed: Tensor, bits: int, count: int) -> tuple[Tensor, Tensor]:
    per = 8 // bits
    mask = (1 << bits) - 1
    codes = torch.stack([(packed >> (bits * j)) & mask for j in range(per)], dim=1).reshape(-1)
    return codes[:count], codes[count:]


# --- Elias–Fano offsets (see the module doc) ------------------------------------------------------------


def _ef_layout(counts: Tensor, lengths: Tensor) -> tuple[int, Tensor, Tensor, int]:
    """``(l, buckets per chunk, high-part bits per chunk, total bits)`` of the Elias–Fano form of offsets
    with ``counts`` per chunk of ``lengths`` (int64 tensors, one entry per chunk)."""
    used = counts > 0
    n = int(counts.sum())
    u = int(lengths[used].sum())
    low = max(0, (u // n).bit_length() - 1) if n else 0
    buckets = torch.where(used, (lengths + (1 << low) - 1) >> low, 0)
    high_bits = torch.where(used, counts + buckets, 0)
    return low, buckets, high_bits, n * low + int(high_bits.sum())


def ef_nbytes(counts: Tensor, lengths: Tensor) -> int:
    """Bytes of the Elias–Fano form of offsets with ``counts`` per chunk of ``lengths``."""
    return math.ceil(_ef_layout(counts.to(torch.int64), lengths.to(torch.int64))[3] / 8)


def _ef_ranks(counts: Tensor) -> tuple[Tensor, Tensor]:
    """``(chunk of each offset, its rank within the chunk)`` for offsets stored chunk after chunk."""
    chunk_of = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    first = torch.cumsum(counts, 0) - counts
    return chunk_of, torch.arange(chunk_of.numel()) - first[chunk_of]


def _bits_to_bytes(bits: Tensor) -> Tensor:
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    return (bits.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def ef_encode(offsets: Tensor, counts: Tensor, lengths: Tensor) -> Tensor:
    """The uint8 Elias–Fano form of ``offsets`` (chunk after chunk, ``counts[c]`` of them in chunk c of
    ``lengths[c]`` elements, strictly increasing within a chunk and below its length)."""
    counts, lengths = counts.to(torch.int64), lengths.to(torch.int64)
    low, _, high_bits, nbits = _ef_layout(counts, lengths)
    off = offsets.reshape(-1).to(torch.int64)
    if off.numel() != int(counts.sum()):
        raise CodecError(f"{off.numel()} offsets for counts that add up to {int(counts.sum())}")
    n = off.numel()
    bits = torch.zeros(math.ceil(nbits / 8) * 8, dtype=torch.uint8)
    if low and n:
        low_bits = bits[: n * low].view(n, low)
        for i in range(low):  # one bit plane at a time: no n × l int64 temporary
            low_bits[:, i] = ((off >> i) & 1).to(torch.uint8)
    chunk_of, rank = _ef_ranks(counts)
    segment_start = n * low + torch.cumsum(high_bits, 0) - high_bits
    bits[segment_start[chunk_of] + (off >> low) + rank] = 1
    return _bits_to_bytes(bits)


def ef_decode(data: Tensor, counts: Tensor, lengths: Tensor, *, what: str) -> Tensor:
    """The int64 offsets of the Elias–Fano tensor ``data`` (named ``what`` in errors) for ``counts`` per
    chunk of ``lengths``, after checking that it is exactly the canonical form of offsets strictly
    increasing within their chunk. ``counts`` and ``lengths`` must already be trusted (from the model's
    reference, or checked against it): the work is bounded by them, never by ``data``."""
    counts, lengths = counts.to(torch.int64), lengths.to(torch.int64)
    low, buckets, high_bits, nbits = _ef_layout(counts, lengths)
    nbytes = math.ceil(nbits / 8)
    if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() != nbytes:
        raise CodecError(f"tensor {what} must be uint8 of shape ({nbytes},) for these counts (Elias–Fano, "
                         f"{low} low bits); got {data.dtype} {tuple(data.shape)}")
    bits = ((data[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)
    if bits[nbits:].any():
        raise CodecError(f"tensor {what} has non-zero padding bits")
    n = int(counts.sum())
    off = torch.zeros(n, dtype=torch.int64)
    if low and n:
        low_bits = bits[: n * low].view(n, low)
        for i in range(low):  # at most 15 bit planes, whatever the number of offsets
            off |= low_bits[:, i].to(torch.int64) << i
    ones = torch.nonzero(bits[n * low : nbits]).reshape(-1)
    if ones.numel() != n:
        raise CodecError(f"tensor {what} marks {ones.numel()} high parts, the counts say {n}")
    chunk_of, rank = _ef_ranks(counts)
    at = ones - (torch.cumsum(high_bits, 0) - high_bits)[chunk_of]
    high = at - rank
    if ((at < 0) | (high >= buckets[chunk_of])).any():
        raise CodecError(f"tensor {what} has a high part outside its chunk's bitvector")
    off |= high << low
    if (off >= lengths[chunk_of]).any():
        raise CodecError(f"tensor {what} has an offset outside its chunk")
    if ((chunk_of[1:] == chunk_of[:-1]) & (off[1:] <= off[:-1])).any():
        raise CodecError(f"tensor {what} has offsets that are not unique and increasing within a chunk")
    return off


def _quantize_rows(values: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Codes (sign bit on top, magnitude level − 1 below) and the per-row scale of kept values."""
    levels = 1 << (bits - 1)
    scale = values.abs().amax(dim=1) / levels
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    m = (values.abs() * inv[:, None]).round_().clamp_(1, levels).to(torch.uint8)
    codes = (m - 1) | ((values < 0).to(torch.uint8) << (bits - 1))
    return codes, scale


def _sparse_encode(x: Tensor, chunk: int, topk: int, bits: int = 2,
                   share: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``(codes, offsets, scales)`` of one float32 tensor: the top-k per chunk (see the module doc)."""
    flat = x.reshape(-1)
    full, rest, _ = _chunk_counts(flat.numel(), chunk, topk, share)
    parts = []
    if full:
        parts.append(flat[: full * chunk].view(full, chunk))
    if rest:
        parts.append(flat[full * chunk:].view(1, rest))
    if not parts:
        return (torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64),
                torch.zeros(0, dtype=torch.float32))
    codes, offsets, scales = [], [], []
    for block in parts:
        kept = min(topk, chunk) if block.shape[1] == chunk else tail_kept(block.shape[1], chunk, topk, share)
        idx = block.abs().topk(kept, dim=1, sorted=False).indices.sort(dim=1).values
        c, sc = _quantize_rows(block.gather(1, idx), bits)
        codes.append(c.reshape(-1))
        offsets.append(idx.reshape(-1))
        scales.append(sc)
    return torch.cat(codes), torch.cat(offsets), torch.cat(scales).to(torch.float32)


def _sparse_layout(reference: dict[str, tuple[tuple[int, ...], torch.dtype]], chunk: int, topk: int,
                   share: bool = True):
    """Per tensor in sorted name order: ``(name, shape, full chunks, rest, kept values)``, and the totals
    of kept values and chunks."""
    rows, kept_total, chunks_total = [], 0, 0
    for name in sorted(reference):
        shape = tuple(reference[name][0])
        full, rest, kept = _chunk_counts(math.prod(shape), chunk, topk, share)
        rows.append((name, shape, full, rest, kept))
        kept_total += kept
        chunks_total += full + (1 if rest else 0)
    return rows, kept_total, chunks_total


def _sparse_chunk_sizes(layout, chunk: int, topk: int, share: bool = True) -> tuple[Tensor, Tensor]:
    """``(values kept, length)`` of every chunk of the stream (int64, one entry per chunk, in order)."""
    counts, lengths = [], []
    for _name, _shape, full, rest, _kept in layout:
        counts.append(torch.full((full,), min(topk, chunk), dtype=torch.int64))
        lengths.append(torch.full((full,), chunk, dtype=torch.int64))
        if rest:
            counts.append(torch.tensor([tail_kept(rest, chunk, topk, share)], dtype=torch.int64))
            lengths.append(torch.tensor([rest], dtype=torch.int64))
    if not counts:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    return torch.cat(counts), torch.cat(lengths)


def _check_tail(tail) -> bool:
    if tail not in TAILS:
        raise CodecError(f"short-chunk rule {str(tail)[:20]!r} is not one of {', '.join(TAILS)}")
    return tail == "share"


def _check_idx(idx) -> str:
    if idx not in IDX_FORMS:
        raise CodecError(f"offset form {str(idx)[:20]!r} is not one of {', '.join(IDX_FORMS)}")
    return idx


def _sparse_decode(name: str, codes: Tensor, offsets: Tensor, scales: Tensor, shape: tuple[int, ...],
                   bits: int, chunk: int, topk: int, share: bool = True) -> Tensor:
    """The dense float32 tensor of one model tensor's slice of the stream, after checking it is canonical
    and in range (the slices have the lengths the layout requires)."""
    n = math.prod(shape)
    full, rest, _ = _chunk_counts(n, chunk, topk, share)
    kept_full = min(topk, chunk)
    out = torch.zeros(n, dtype=torch.float32)
    levels = 1 << (bits - 1)
    blocks = []
    if full:
        blocks.append((0, full, chunk, kept_full, 0))
    if rest:
        blocks.append((full * kept_full, 1, rest, tail_kept(rest, chunk, topk, share), full))
    for start, rows, length, kept, first_chunk in blocks:
        off = offsets[start : start + rows * kept].view(rows, kept).to(torch.int64)
        if ((off < 0) | (off >= length)).any():
            raise CodecError(f"tensor {name} has an index outside its chunk of {length}")
        if kept > 1 and not (off[:, 1:] > off[:, :-1]).all():
            raise CodecError(f"tensor {name} has indices that are not unique and increasing within a chunk")
        c = codes[start : start + rows * kept].view(rows, kept)
        magnitude = ((c & (levels - 1)) + 1).to(torch.float32)
        sign = torch.where((c >> (bits - 1)) > 0, -1.0, 1.0)
        values = sign * magnitude * scales[first_chunk : first_chunk + rows, None]
        base = (torch.arange(rows, dtype=torch.int64) * chunk + first_chunk * chunk)[:, None]
        out[(base + off).reshape(-1)] = values.reshape(-1)
    if not torch.isfinite(out).all():
        raise CodecError(f"tensor {name} has non-finite values after decoding (scale too large)")
    return out.view(shape)


def _decode_sparse_update(tensors: dict[str, Tensor], reference, codec: str, chunk: int,
                          topk: int, idx: str, share: bool) -> dict[str, Tensor]:
    bits = SPARSE_BITS[codec]
    layout, total, n_chunks = _sparse_layout(reference, chunk, topk, share)
    expected = {SPARSE_CODES: (torch.uint8, (math.ceil(total * bits / 8),)),
                SPARSE_SCALE: (torch.float32, (n_chunks,))}
    if idx == "int16":
        expected[SPARSE_IDX] = (torch.int16, (total,))
    for key, (dtype, want) in expected.items():
        t = tensors[key]
        if t.dtype != dtype or tuple(t.shape) != want:
            raise CodecError(f"tensor {key} must be {dtype} of shape {want} for this model at chunk {chunk}, "
                             f"topk {topk}; got {t.dtype} {tuple(t.shape)}")
    scales = tensors[SPARSE_SCALE]
    if not torch.isfinite(scales).all():
        raise CodecError(f"tensor {SPARSE_SCALE} has non-finite values")
    if (scales < 0).any():
        raise CodecError(f"tensor {SPARSE_SCALE} has a negative scale")
    codes, padding = _unpack(tensors[SPARSE_CODES], bits, total)
    if padding.any():
        raise CodecError(f"tensor {SPARSE_CODES} has non-zero padding bits")
    offsets = tensors[SPARSE_IDX]
    if idx == "ef":
        offsets = ef_decode(offsets, *_sparse_chunk_sizes(layout, chunk, topk, share), what=SPARSE_IDX)
    out: dict[str, Tensor] = {}
    at, chunk_at = 0, 0
    for name, shape, full, rest, kept in layout:
        if not reference[name][1].is_floating_point:
            raise CodecError(f"model tensor {name} is {reference[name][1]}, updates are only defined for floating point")
        n_chunks_here = full + (1 if rest else 0)
        out[name] = _sparse_decode(name, codes[at : at + kept], offsets[at : at + kept],
                                   scales[chunk_at : chunk_at + n_chunks_here], shape, bits, chunk, topk, share)
        at += kept
        chunk_at += n_chunks_here
    return {name: out[name] for name in reference}


def _encoded_tensors(delta: dict[str, Tensor], codec: str, chunk: int, topk: int = 0,
                     idx: str = "ef", share: bool = True) -> dict[str, Tensor]:
    _check_codec(codec)
    out: dict[str, Tensor] = {}
    sparse: list[tuple[Tensor, Tensor, Tensor]] = []
    for name in sorted(delta) if codec in SPARSE_BITS else delta:
        if "::" in name:
            raise CodecError(f"tensor name {name!r} contains '::', which is reserved (e.g. {SCALE_SUFFIX!r})")
        x = delta[name].detach().to("cpu", torch.float32)
        if not torch.isfinite(x).all():
            raise CodecError(f"tensor {name} has non-finite values")
        if codec == "fp32":
            out[name] = x.contiguous()
        elif codec == "fp16":
            if x.numel() and x.abs().max().item() > _FP16_MAX:
                raise CodecError(f"tensor {name} has values beyond the fp16 range; use fp32 or int8")
            out[name] = x.to(torch.float16).contiguous()
        elif codec == "int8":
            q, absmax = _quantize_int8(x, chunk)
            out[name] = q.contiguous()
            out[name + SCALE_SUFFIX] = absmax.contiguous()
        else:
            sparse.append(_sparse_encode(x, chunk, topk, SPARSE_BITS[codec], share))
    if codec in SPARSE_BITS:
        # One stream for the whole model, tensors in sorted name order: three tensors in the header instead
        # of three per model tensor (the header would otherwise outweigh a small model's payload).
        codes = torch.cat([c for c, _, _ in sparse]) if sparse else torch.zeros(0, dtype=torch.uint8)
        out[SPARSE_CODES] = _pack(codes, SPARSE_BITS[codec]).contiguous()
        offsets = torch.cat([o for _, o, _ in sparse]) if sparse else torch.zeros(0, dtype=torch.int64)
        if idx == "ef":
            layout, _, _ = _sparse_layout(reference_of(delta), chunk, topk, share)
            offsets = ef_encode(offsets, *_sparse_chunk_sizes(layout, chunk, topk, share))
        out[SPARSE_IDX] = offsets.to(torch.int16 if idx == "int16" else torch.uint8).contiguous()
        out[SPARSE_SCALE] = (torch.cat([sc for _, _, sc in sparse]) if sparse
                             else torch.zeros(0, dtype=torch.float32)).contiguous()
    return out


def _check_chunk(chunk, codec: str = "int8") -> int:
    allowed = SPARSE_CHUNKS if codec in SPARSE_BITS else INT8_CHUNKS
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk not in allowed:
        kind = "sparse" if codec in SPARSE_BITS else "int8"
        raise CodecError(f"{kind} chunk {str(chunk)[:20]!r} is not an allowed size (a power of two from "
                         f"{allowed[0]} to {allowed[-1]})")
    return chunk


def check_density(density) -> float:
    """``density`` as a float, or :class:`CodecError` when it is not a share a sparse codec accepts."""
    if isinstance(density, bool) or not isinstance(density, int | float) or not (
            MIN_DENSITY <= density <= MAX_DENSITY):
        raise CodecError(f"density {str(density)[:20]!r} must be a number from {MIN_DENSITY} to {MAX_DENSITY}")
    return float(density)


def _check_topk(topk, chunk: int) -> int:
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= max(1, round(MAX_DENSITY * chunk)):
        raise CodecError(f"sparse topk {str(topk)[:20]!r} must be an integer from 1 to "
                         f"{max(1, round(MAX_DENSITY * chunk))} for chunk {chunk}")
    return topk


def encode_update(delta: dict[str, Tensor], codec: str, *, chunk: int = INT8_CHUNK,
                  density: float = DENSITY, idx: str = "ef", tail: str = "share") -> bytes:
    """Encode a pseudo-gradient as safetensors bytes with ``{"format", "codec", "chunk", "topk", "idx"}``
    metadata (``chunk`` for int8 and the sparse codecs, ``topk`` for the sparse codecs only, ``idx`` for the
    sparse codecs with Elias–Fano offsets; ``density`` and ``idx`` are used by the sparse codecs only:
    ``idx="int16"`` writes the offsets as agents before Elias–Fano did; ``tail="min"`` keeps
    ``min(topk, length)`` values of a short chunk, as agents before ``"tail": "share"`` did, see
    :func:`tail_kept`)."""
    _check_codec(codec)
    _check_chunk(chunk, codec)
    _check_idx(idx)
    share = _check_tail(tail)
    topk = topk_per_chunk(chunk, check_density(density)) if codec in SPARSE_BITS else 0
    tensors = _encoded_tensors(delta, codec, chunk, topk, idx, share)
    meta = {"format": FORMAT, "codec": codec}
    if codec == "int8" or codec in SPARSE_BITS:
        meta["chunk"] = chunk
    if codec in SPARSE_BITS:
        meta["topk"] = topk
        if idx == "ef":
            meta["idx"] = "ef"
        if share:
            meta["tail"] = "share"
    # One metadata key holding sorted JSON: safetensors writes its metadata map in arbitrary order, and
    # identical updates should be identical bytes.
    return st_save(tensors, metadata={META_KEY: json.dumps(meta, sort_keys=True, separators=(",", ":"))})


def payload_nbytes(reference: dict[str, tuple[tuple[int, ...], torch.dtype]], codec: str,
                   *, chunk: int = INT8_CHUNK, density: float = DENSITY, idx: str = "ef", tail: str = "share") -> int:
    """Bytes of tensor data an encoded update carries (without the small safetensors header). For the
    sparse codecs ``idx`` names the offset form and ``tail`` the short-chunk rule; int16 offsets are never
    fewer bytes than Elias–Fano ones and ``tail="min"`` never keeps fewer values than ``"share"``, so
    ``idx="int16", tail="min"`` bounds an upload in any form."""
    _check_codec(codec)
    _check_chunk(chunk, codec)
    _check_idx(idx)
    share = _check_tail(tail)
    topk = topk_per_chunk(chunk, check_density(density)) if codec in SPARSE_BITS else 0
    total = 0
    for shape, _dtype in reference.values():
        n = math.prod(shape)
        if codec == "fp32":
            total += 4 * n
        elif codec == "fp16":
            total += 2 * n
        elif codec == "int8":
            total += n + 4 * max(1, math.ceil(n / chunk))
    if codec in SPARSE_BITS:
        layout, kept, n_chunks = _sparse_layout(reference, chunk, topk, share)
        offsets = ef_nbytes(*_sparse_chunk_sizes(layout, chunk, topk, share)) if idx == "ef" else 2 * kept
        total = math.ceil(kept * SPARSE_BITS[codec] / 8) + offsets + 4 * n_chunks
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
    sparse = codec in SPARSE_BITS
    chunk = _check_chunk(meta.get("chunk"), codec) if codec == "int8" or sparse else INT8_CHUNK
    topk = _check_topk(meta.get("topk"), chunk) if sparse else 0
    if not sparse and "topk" in meta:
        raise CodecError(f"update metadata has 'topk', which codec {codec} does not use")
    if "idx" in meta and (not sparse or meta["idx"] != "ef"):
        raise CodecError(f"update metadata 'idx' {str(meta['idx'])[:20]!r} is not allowed for codec {codec} "
                         "(only 'ef' for a sparse codec; without it offsets are int16)")
    idx = "ef" if "idx" in meta else "int16"
    if "tail" in meta and (not sparse or meta["tail"] != "share"):
        raise CodecError(f"update metadata 'tail' {str(meta['tail'])[:20]!r} is not allowed for codec {codec} "
                         "(only 'share' for a sparse codec; without it a short chunk keeps min(topk, length))")
    share = "tail" in meta
    expected_names = {SPARSE_CODES, SPARSE_IDX, SPARSE_SCALE} if sparse else set(reference)
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
    if sparse:
        return _decode_sparse_update(tensors, reference, codec, chunk, topk, idx, share)
    stored_dtype = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}.get(codec)
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
