"""Sparse training state and the sparse published step (SparseLoCo, arXiv:2508.15706).

Error feedback, per worker and per run, kept by the agent between rounds like its inner optimizer state::

    e ← β · e + Δ            (Δ: this round's pseudo-gradient)
    send c = C(e)            (C: a sparse codec of ``diloco.codecs``, e.g. topk2 at 2% density)
    e ← e − decode(c)        (what was not sent waits for a later round)

With β < 1 the buffer is also the outer momentum SparseLoCo drops from the server: a value that stays
large round after round is sent with the accumulated weight of the rounds it waited.

The published step. After a round the server publishes the exact float32 tensors ``d`` it subtracted,
``θ_{r+1} = θ_r − d`` elementwise (one IEEE subtraction per element, so every CPU computes the same bits).
An agent holding round r's checkpoint downloads only ``d`` (sparse where the aggregate is sparse) instead
of the checkpoint: :func:`apply_published_delta` rebuilds θ_{r+1} bitwise, and ``diloco.checkpoint.save_weights``
of it with the round's metadata hashes to the published checkpoint's sha256.

A published step travels as safetensors with metadata ``{"agora_step": '{"chunk":4096,"format":
"agora-step-v1","idx":"ef","values":"int8"}'}`` and, optionally, ``"agora_step_meta"`` (a small JSON object
the caller chooses, e.g. the base and result checkpoint hashes and the checkpoint metadata). Its tensors,
model tensors in sorted name order, chunk after chunk of ``chunk`` elements:

- ``"::count"`` int32, one per chunk: how many values the chunk carries; a count equal to the chunk's
  length means the chunk is dense (all its values, zeros included, no offsets);
- ``"::idx"``: the offsets inside their chunk of the values of the chunks that are not dense, strictly
  increasing within a chunk. With ``"idx": "ef"`` it is uint8, the Elias–Fano form of ``diloco.codecs``
  (its counts: ``"::count"``, 0 for dense chunks; l from the total density of the sparse chunks); without
  ``"idx"`` (steps published before it) it is int16, one offset each;
- ``"::values"``, the values chunk after chunk, in one of three forms (``"values"``):

  - ``"int8"`` when every chunk's values are exactly ``q · 2^e``, q an integer in −127..127 and one e per
    chunk (``diloco.outer``'s ``publish="int8"`` rounds the step so): ``"::values"`` is int8 q and
    ``"::exp"`` int8 e, one per chunk whose count is not 0, in chunk order. A value is
    ``float(q) · 2^e``, exactly, and a zero is +0.0. e lies in −40..40 (``EXP_RANGE``): that holds every
    exponent the server's rounding uses (−24 up to float16's range) with room to spare, keeps every
    nonzero value a normal float32 (≥ 2⁻⁴⁰, far from the subnormals a CPU may flush to zero) and every
    value finite (≤ 127 · 2⁴⁰). −128 is refused because the encoder never writes it (q is symmetric).
    The encoder takes e = ``diloco.outer.pow2_exponents`` of the chunk's largest magnitude (the finest
    quantum that holds it, at least 2⁻²⁴ as in the server's rounding) and checks ``float(q) · 2^e``
    against every value bitwise (a -0.0 in a dense chunk fails it); if a chunk fails, the whole step
    falls back to the next form. An agent of a release before this form refuses such a step (its
    ``CodecError``) and downloads the checkpoint instead;
  - ``"fp16"`` when not, but every value is exactly a float16 (``publish="fp16"`` rounds the step so);
  - ``"fp32"`` else.

  Steps published before the int8 form (fp16 / fp32 values) still decode.

A chunk is sent dense when its offsets would cost at least as many bits as its zeros (8 bits a zero with
int8 values, 16 with float16 ones): Elias–Fano costs n·(l + 1) + ⌈u / 2^l⌉ bits for n offsets in a chunk of
u elements, l being the low width of the chunks at most half full (those the int16 form sent sparse).
"""

from __future__ import annotations

import json
import math

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from diloco import safejson
from diloco.codecs import (
    DENSITY,
    IDX_FORMS,
    INT8_CHUNK,
    SPARSE_BITS,
    SPARSE_CHUNKS,
    CodecError,
    _ef_layout,
    _read_header,
    check_density,
    decode_update,
    ef_decode,
    ef_encode,
    encode_update,
    reference_of,
)
from diloco.outer import pow2_exponents

Reference = dict[str, tuple[tuple[int, ...], torch.dtype]]

BETA = 0.95  # SparseLoCo's error-feedback decay
STEP_FORMAT = "agora-step-v1"
STEP_META_KEY = "agora_step"
STEP_USER_META_KEY = "agora_step_meta"
_STEP_META_MAX_CHARS = 256
_USER_META_MAX_CHARS = 16_384
_STEP_HEADER_MAX = 64 * 1024
COUNT, IDX, VALUES, EXP = "::count", "::idx", "::values", "::exp"
VALUE_FORMS = ("int8", "fp16", "fp32")  # the published step's values, narrowest first
EXP_RANGE = (-40, 40)  # the exponents int8 values may carry (see the module doc)
_VALUE_DTYPES = {"int8": torch.int8, "fp16": torch.float16, "fp32": torch.float32}
EF_FORMAT = "agora-error-feedback-v1"
EF_META_KEY = "agora_error_feedback"
_EF_PREFIX = "error."


def is_sparse(compression: str) -> bool:
    return compression in SPARSE_BITS


def momentum_roles(compression: str, outer_momentum: float) -> tuple[float, float | None]:
    """``(server momentum, workers' error-feedback β)`` for a run's ``outer_momentum``. With a sparse codec
    the workers' error feedback takes the place of outer momentum (SparseLoCo): the run's outer momentum is
    β and the server's step is plain SGD on the mean of the sparse updates (``bench.fidelity_sparse``
    measured Nesterov momentum on top of error feedback too; see the README). Dense codecs: outer
    momentum is the server's, and there is no error feedback."""
    if is_sparse(compression):
        return 0.0, _check_beta(outer_momentum)
    return float(outer_momentum), None


# --- error feedback --------------------------------------------------------------------------------------


def accumulate(error: dict[str, Tensor] | None, delta: dict[str, Tensor], *, beta: float) -> dict[str, Tensor]:
    """``β · e + Δ`` as new float32 tensors (``e`` is zero when None)."""
    out = {}
    for name, d in delta.items():
        d = d.detach().to("cpu", torch.float32)
        out[name] = d.clone() if error is None else error[name].mul(beta).add_(d)
    return out


def compress(error: dict[str, Tensor], codec: str, *, chunk: int = INT8_CHUNK,
             density: float = DENSITY) -> tuple[bytes, dict[str, Tensor]]:
    """``(encoded update, what it decodes to)``: the bytes to upload and the part of ``error`` they carry."""
    data = encode_update(error, codec, chunk=chunk, density=density)
    return data, decode_update(data, reference_of(error))


def _check_beta(beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"error-feedback beta {str(beta)[:20]!r} must be a number from 0 to 1")
    return float(beta)


class ErrorFeedback:
    """One worker's error-feedback buffer for one run: :meth:`encode` turns each round's pseudo-gradient
    into the sparse update to upload; :meth:`save` / :meth:`load` keep the buffer between rounds."""

    def __init__(self, *, codec: str = "topk2", beta: float = BETA, chunk: int = INT8_CHUNK,
                 density: float = DENSITY):
        if codec not in SPARSE_BITS:
            raise CodecError(f"error feedback needs a sparse codec ({', '.join(SPARSE_BITS)}), not {codec!r}")
        if chunk not in SPARSE_CHUNKS:
            raise CodecError(f"sparse chunk {chunk!r} is not an allowed size")
        self.codec, self.chunk = codec, chunk
        self.density = check_density(density)
        self.beta = _check_beta(beta)
        self.error: dict[str, Tensor] | None = None
        self.rounds = 0

    def encode(self, delta: dict[str, Tensor]) -> bytes:
        """Fold ``delta`` into the buffer, return the encoded sparse update and keep what it leaves out."""
        if self.error is not None and reference_of(self.error) != reference_of(
                {k: v.to(torch.float32) for k, v in delta.items()}):
            raise ValueError("pseudo-gradient names or shapes differ from the error-feedback buffer's")
        e = accumulate(self.error, delta, beta=self.beta)
        data, sent = compress(e, self.codec, chunk=self.chunk, density=self.density)
        for name, t in e.items():
            t.sub_(sent[name])
        self.error = e
        self.rounds += 1
        return data

    def _meta(self) -> dict:
        return {"format": EF_FORMAT, "codec": self.codec, "chunk": self.chunk, "density": self.density,
                "beta": self.beta, "rounds": self.rounds}

    def save(self) -> bytes:
        """The buffer as safetensors bytes (``"error.<name>"`` float32 tensors, settings in metadata)."""
        tensors = {f"{_EF_PREFIX}{k}": v.contiguous() for k, v in (self.error or {}).items()}
        return st_save(tensors, metadata={EF_META_KEY: json.dumps(self._meta(), sort_keys=True,
                                                                  separators=(",", ":"))})

    @classmethod
    def load(cls, data: bytes, reference: Reference | None = None) -> ErrorFeedback:
        """Inverse of :meth:`save`; with ``reference`` (``codecs.reference_of`` of the model) the buffer
        must have exactly the model's names and shapes. Raises :class:`CodecError` on anything else."""
        header = _read_header(bytes(data), max_bytes=64 * 1024 + 1024 * len(reference or {"": 0}) * 2)
        raw = (header.get("__metadata__") or {}).get(EF_META_KEY)
        try:
            meta = safejson.loads(raw, max_depth=1, what=EF_META_KEY) if isinstance(raw, str) else None
        except ValueError:
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != EF_FORMAT:
            raise CodecError(f"error-feedback state lacks a valid {EF_META_KEY!r} entry")
        try:
            ef = cls(codec=meta.get("codec"), beta=meta.get("beta"), chunk=meta.get("chunk"),
                     density=meta.get("density"))
        except ValueError as exc:
            raise CodecError(f"error-feedback state: {exc}") from None
        rounds = meta.get("rounds")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise CodecError("error-feedback state: rounds must be a non-negative integer")
        ef.rounds = rounds
        try:
            tensors = st_load(bytes(data))
        except Exception as exc:  # safetensors raises its own error types for every malformed input
            raise CodecError(f"error-feedback state is not a safetensors file: {exc}") from exc
        error = {}
        for key, t in tensors.items():
            if not key.startswith(_EF_PREFIX):
                raise CodecError(f"error-feedback state has an unknown entry {key[:80]!r}")
            if t.dtype != torch.float32 or not torch.isfinite(t).all():
                raise CodecError(f"error-feedback tensor {key[:80]} must be finite float32")
            error[key[len(_EF_PREFIX):]] = t
        if reference is not None and error and {k: tuple(v.shape) for k, v in error.items()} != {
                k: tuple(shape) for k, (shape, _) in reference.items()}:
            raise CodecError("error-feedback state does not match the model's tensor names and shapes")
        ef.error = error or None
        return ef


# --- the published step ----------------------------------------------------------------------------------


def _chunks(n: int, chunk: int) -> tuple[int, int]:
    return divmod(n, chunk)


def _cat(parts: list[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)


def _dense_chunks(nnz: Tensor, lengths: Tensor, value_bits: int) -> Tensor:
    """Which chunks a step sends dense: those whose Elias–Fano offsets would cost at least as many bits as
    their zeros at ``value_bits`` each, at the low width l of the chunks at most half full."""
    half_full = nnz * 2 < lengths
    low, _, _, _ = _ef_layout(torch.where(half_full, nnz, 0), lengths)
    offset_bits = torch.where(nnz > 0, nnz * (low + 1) + ((lengths + (1 << low) - 1) >> low), 0)
    return offset_bits >= value_bits * (lengths - nnz)


def _pow2(e: Tensor) -> Tensor:
    """2^e as float32, exactly, built from its bits (e within ``EXP_RANGE``: a normal float32)."""
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def _int8_values(v: Tensor, e: Tensor) -> Tensor | None:
    """``v`` (float32) as int8 q with ``q · 2^e == v`` bitwise (``e``: each value's exponent), or None
    when some value is not so (a value finer than 2^e, beyond 127 · 2^e, a -0.0 or e outside
    ``EXP_RANGE``)."""
    if v.numel() and (int(e.min()) < EXP_RANGE[0] or int(e.max()) > EXP_RANGE[1]):
        return None
    q = v.mul(_pow2(-e)).round_().clamp_(-127, 127).to(torch.int8)  # |v| ≤ 127 · 2^e: no overflow
    # checked as the decoder computes it, from the int8 q (where a -0.0 has become 0)
    if not torch.equal(q.to(torch.float32).mul_(_pow2(e)).view(torch.int32), v.view(torch.int32)):
        return None
    return q


def _split(blocks: list[Tensor], nonzero: list[Tensor], dense: Tensor) -> tuple[Tensor, Tensor]:
    """``(offsets, values)``: the offsets in their chunk of the nonzero values of the sparse chunks, and
    the values of every chunk (all of a dense chunk's), chunk after chunk."""
    offsets, values, at = [], [], 0
    for block, mask in zip(blocks, nonzero, strict=True):
        dense_here = dense[at : at + block.shape[0], None]
        offsets.append(torch.nonzero(mask & ~dense_here)[:, 1])
        values.append(block[mask | dense_here])
        at += block.shape[0]
    return _cat(offsets, torch.int64), _cat(values, torch.float32)


def encode_published_delta(delta: dict[str, Tensor], *, chunk: int = INT8_CHUNK, meta: dict | None = None,
                           idx: str = "ef", values: str | None = None) -> bytes:
    """Lossless bytes of the step ``d`` (float32 tensors): sparse chunks as offsets + values, dense chunks
    as values, in the narrowest form that holds every value exactly, ``values`` (``VALUE_FORMS``) the
    narrowest tried: int8 times a power of two per chunk, else float16, else float32. ``meta``: a small
    JSON object carried along. ``idx="int16"`` writes the offsets (and picks dense chunks) as steps before
    Elias–Fano did; ``values`` is then fp16 unless given (that release knew no int8 values, and int8 values
    need Elias–Fano offsets)."""
    if chunk not in SPARSE_CHUNKS:
        raise CodecError(f"sparse chunk {chunk!r} is not an allowed size")
    if idx not in IDX_FORMS:
        raise CodecError(f"offset form {str(idx)[:20]!r} is not one of {', '.join(IDX_FORMS)}")
    if values is None:
        values = "int8" if idx == "ef" else "fp16"
    if values not in VALUE_FORMS:
        raise CodecError(f"values form {str(values)[:20]!r} is not one of {', '.join(VALUE_FORMS)}")
    if values == "int8" and idx != "ef":
        raise CodecError("int8 step values need Elias–Fano offsets (idx 'ef')")
    blocks = []
    for name in sorted(delta):
        if "::" in name:
            raise CodecError(f"tensor name {name!r} contains '::', which is reserved")
        flat = delta[name].detach().to("cpu", torch.float32).reshape(-1)
        if not torch.isfinite(flat).all():
            raise CodecError(f"step tensor {name} has non-finite values")
        full, rest = _chunks(flat.numel(), chunk)
        blocks += ([flat[: full * chunk].view(full, chunk)] if full else []) + (
            [flat[full * chunk:].view(1, rest)] if rest else [])
    # A -0.0 is a zero here (a sparse chunk does not carry it): steps from ``diloco.outer`` have none.
    nonzero = [block != 0 for block in blocks]
    nnz = _cat([m.sum(dim=1) for m in nonzero], torch.int64)
    lengths = _cat([torch.full((b.shape[0],), b.shape[1], dtype=torch.int64) for b in blocks], torch.int64)
    tensors = {}
    if values == "int8":
        dense = _dense_chunks(nnz, lengths, 8)
        counts = torch.where(dense, lengths, nnz)
        exps = pow2_exponents(_cat([b.abs().amax(dim=1) for b in blocks], torch.float32)).to(torch.int64)
        off, v = _split(blocks, nonzero, dense)
        q = _int8_values(v, torch.repeat_interleave(exps, counts))
        if q is not None:
            tensors = {VALUES: q, EXP: exps[counts > 0].to(torch.int8)}
        else:
            values = "fp16"
    if not tensors:
        # int16: 2 bytes an offset against 2 bytes a float16 zero.
        dense = _dense_chunks(nnz, lengths, 16) if idx == "ef" else nnz * 2 >= lengths
        counts = torch.where(dense, lengths, nnz)
        off, v = _split(blocks, nonzero, dense)
        half = v.to(torch.float16)
        if values == "fp16" and bool(torch.isfinite(half).all()) and torch.equal(half.to(torch.float32), v):
            tensors = {VALUES: half}
        else:
            values, tensors = "fp32", {VALUES: v}
    idx_tensor = ef_encode(off, torch.where(dense, 0, nnz), lengths) if idx == "ef" else off.to(torch.int16)
    step_meta = {"format": STEP_FORMAT, "chunk": chunk, "values": values}
    if idx == "ef":
        step_meta["idx"] = "ef"
    metadata = {STEP_META_KEY: json.dumps(step_meta, sort_keys=True, separators=(",", ":"))}
    if meta is not None:
        text = json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False)
        if len(text) > _USER_META_MAX_CHARS:
            raise CodecError(f"step metadata is longer than {_USER_META_MAX_CHARS} characters")
        metadata[STEP_USER_META_KEY] = text
    tensors = {COUNT: counts.to(torch.int32), IDX: idx_tensor, **tensors}
    return st_save({k: t.contiguous() for k, t in tensors.items()}, metadata=metadata)


def _step_header(data: bytes) -> tuple[dict, dict]:
    header = _read_header(data, max_bytes=_STEP_HEADER_MAX + _USER_META_MAX_CHARS * 2)
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or set(metadata) - {STEP_META_KEY, STEP_USER_META_KEY}:
        raise CodecError("published step has unknown metadata")
    raw = metadata.get(STEP_META_KEY)
    if not isinstance(raw, str) or len(raw) > _STEP_META_MAX_CHARS:
        raise CodecError(f"published step lacks a valid {STEP_META_KEY!r} entry")
    try:
        meta = safejson.loads(raw, max_depth=1, what=STEP_META_KEY)
    except ValueError:
        meta = None
    if (not isinstance(meta, dict) or set(meta) - {"idx"} != {"format", "chunk", "values"}
            or meta["format"] != STEP_FORMAT):
        raise CodecError(f"published step lacks a valid {STEP_META_KEY!r} entry (format {STEP_FORMAT!r})")
    if "idx" in meta and meta["idx"] != "ef":
        raise CodecError(f"published step idx {str(meta['idx'])[:20]!r} must be 'ef' (without it: int16)")
    if isinstance(meta["chunk"], bool) or meta["chunk"] not in SPARSE_CHUNKS:
        raise CodecError(f"published step chunk {str(meta['chunk'])[:20]!r} is not an allowed size")
    if meta["values"] not in VALUE_FORMS:
        raise CodecError(f"published step values {str(meta['values'])[:20]!r} must be one of "
                         f"{', '.join(VALUE_FORMS)}")
    names = (COUNT, IDX, VALUES, EXP) if meta["values"] == "int8" else (COUNT, IDX, VALUES)
    if set(header) - {"__metadata__"} != set(names):
        raise CodecError(f"published step with {meta['values']} values must hold exactly the tensors "
                         f"{', '.join(names)}")
    return header, meta


def published_meta(data: bytes) -> dict:
    """The caller's JSON object carried by a published step ({} when none)."""
    header, _ = _step_header(bytes(data))
    raw = (header.get("__metadata__") or {}).get(STEP_USER_META_KEY)
    if raw is None:
        return {}
    try:
        meta = safejson.loads(raw, max_depth=8, what=STEP_USER_META_KEY) if isinstance(raw, str) else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise CodecError(f"published step {STEP_USER_META_KEY!r} is not a JSON object")
    return meta


def _int8_decode(q: Tensor, exps: Tensor, counts: Tensor) -> Tensor:
    """``q · 2^e`` as float32, exactly (+0.0 for q = 0), after checking ``"::exp"`` against the counts."""
    carrying = counts[counts > 0]
    if exps.dtype != torch.int8 or tuple(exps.shape) != (carrying.numel(),):
        raise CodecError(f"{EXP} must be int8 of shape ({carrying.numel()},) (one per chunk that carries "
                         f"values), got {exps.dtype} {tuple(exps.shape)}")
    low, high = EXP_RANGE
    if ((exps < low) | (exps > high)).any():
        raise CodecError(f"{EXP} has an exponent outside {low}..{high}")
    if (q == -128).any():
        raise CodecError(f"{VALUES} has the int8 value -128, outside -127..127")
    return q.to(torch.float32).mul_(_pow2(torch.repeat_interleave(exps.to(torch.int64), carrying)))


def decode_published_delta(data: bytes, reference: Reference) -> dict[str, Tensor]:
    """The dense float32 step ``d`` of a published step, checked against the model's ``reference``."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CodecError("published step must be bytes")
    data = bytes(data)
    _, meta = _step_header(data)
    chunk = meta["chunk"]
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types for every malformed input
        raise CodecError(f"published step is not a safetensors file: {exc}") from exc
    counts, offsets, values = tensors[COUNT], tensors[IDX], tensors[VALUES]
    value_dtype = _VALUE_DTYPES[meta["values"]]
    layout = []
    for name in sorted(reference):
        shape, dtype = reference[name]
        if not dtype.is_floating_point:
            raise CodecError(f"model tensor {name} is {dtype}, steps are only defined for floating point")
        full, rest = _chunks(math.prod(shape), chunk)
        layout.append((name, tuple(shape), full, rest))
    n_chunks = sum(full + (1 if rest else 0) for _, _, full, rest in layout)
    if counts.dtype != torch.int32 or tuple(counts.shape) != (n_chunks,):
        raise CodecError(f"{COUNT} must be int32 of shape ({n_chunks},), got {counts.dtype} {tuple(counts.shape)}")
    ef = meta.get("idx") == "ef"
    if not ef and (offsets.dtype != torch.int16 or offsets.dim() != 1):
        raise CodecError(f"{IDX} must be a 1-d int16 tensor, got {offsets.dtype} {tuple(offsets.shape)}")
    if values.dtype != value_dtype or values.dim() != 1:
        raise CodecError(f"{VALUES} must be a 1-d {value_dtype} tensor, got {values.dtype} {tuple(values.shape)}")
    lengths = torch.cat([torch.tensor([chunk] * full + ([rest] if rest else []), dtype=torch.int64)
                         for _, _, full, rest in layout]) if layout else torch.zeros(0, dtype=torch.int64)
    c = counts.to(torch.int64)
    if ((c < 0) | (c > lengths)).any():
        raise CodecError(f"{COUNT} has a count outside 0..chunk length")
    dense = c == lengths
    if int(c.sum()) != values.numel():
        raise CodecError(f"{VALUES} has {values.numel()} values, the counts say {int(c.sum())}")
    sparse_counts = torch.where(dense, 0, c)
    if not ef and int(sparse_counts.sum()) != offsets.numel():
        raise CodecError(f"{IDX} has {offsets.numel()} offsets, the counts say {int(sparse_counts.sum())}")
    if meta["values"] == "int8":
        values = _int8_decode(values, tensors[EXP], c)
    if not torch.isfinite(values).all():
        raise CodecError(f"{VALUES} has non-finite values")
    # Every offset must lie in its chunk and rise strictly within it (``ef_decode`` checks both, and that
    # its bytes are exactly those of the counts, which are already checked against the model).
    chunk_of = torch.repeat_interleave(torch.arange(n_chunks), sparse_counts)
    if ef:
        off = ef_decode(offsets, sparse_counts, lengths, what=IDX)
    else:
        off = offsets.to(torch.int64)
        if ((off < 0) | (off >= lengths[chunk_of])).any():
            raise CodecError(f"{IDX} has an offset outside its chunk")
        same_chunk = chunk_of[1:] == chunk_of[:-1]
        if (same_chunk & (off[1:] <= off[:-1])).any():
            raise CodecError(f"{IDX} has offsets that are not unique and increasing within a chunk")
    # Values are stored chunk after chunk and rise within a chunk, so they fill the marked positions of
    # the concatenated (sorted-name) model in order.
    starts = torch.cumsum(lengths, 0) - lengths
    mask = torch.repeat_interleave(dense, lengths)
    mask[starts[chunk_of] + off] = True
    flat = torch.zeros(mask.numel(), dtype=torch.float32)
    flat[mask] = values.to(torch.float32)  # float16 → float32 is exact
    out, at = {}, 0
    for name, shape, full, rest in layout:
        n = full * chunk + rest
        out[name] = flat[at : at + n].view(shape)
        at += n
    return {name: out[name] for name in reference}


def apply_published_delta(state: dict[str, Tensor], data: bytes) -> dict[str, Tensor]:
    """θ − d for the published step ``data``: new float32 tensors, bitwise what the server computed.
    ``state`` must be float32 with the model's names and shapes; the result must be finite."""
    for name, t in state.items():
        if t.dtype != torch.float32:
            raise CodecError(f"state tensor {name} is {t.dtype}; published steps apply to float32 weights")
    d = decode_published_delta(data, reference_of(state))
    out = {}
    for name, theta in state.items():
        new = theta.detach().to("cpu").sub(d[name])
        if not torch.isfinite(new).all():
            raise CodecError(f"applying the step makes {name} non-finite")
        out[name] = new
    return out


__all__ = [
    "BETA", "ErrorFeedback", "accumulate", "apply_published_delta", "compress", "decode_published_delta",
    "encode_published_delta", "is_sparse", "momentum_roles", "published_meta",
]
