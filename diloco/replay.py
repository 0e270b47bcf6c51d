"""Replay detection: an update that repeats earlier work is not new work.

An update is a replay when its sha256 equals an earlier update's, or when its direction is nearly identical
(cosine above ``threshold``, default 0.99) to an earlier update of the run or to a public outer step
(θ_{r−1} − θ_r, which anyone can compute from the published checkpoints). Honest updates of different
shards or rounds stay far below that (cosine 0.5 to 0.9 on the tiny model).

The server does not keep every update: it keeps a small *sketch* of each, a count sketch with random signs.
Coordinate i of tensor t goes to bucket ``i mod dim`` with a sign drawn from a generator seeded by
(seed, t): the sketch is linear, ⟨S x, S y⟩ is an unbiased estimate of ⟨x, y⟩, and its error shrinks as
1/sqrt(dim). The seed should be the server's secret: a worker who knew the signs could add a small vector
that moves the sketch a lot.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math

import torch
from torch import Tensor

DEFAULT_DIM = 1024
DEFAULT_THRESHOLD = 0.99
MAX_DIM = 1 << 16


@functools.lru_cache(maxsize=512)
def _signs(seed: int, name: str, n: int) -> Tensor:
    """The ±1 signs of tensor ``name``'s coordinates (int8: one byte a parameter, kept so that sketching a
    round's updates draws them once)."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8).mul_(2).sub_(1)


@torch.no_grad()
def sketch(update: dict[str, Tensor], *, seed: int, dim: int = DEFAULT_DIM) -> Tensor:
    """The count sketch of ``update`` (float32, shape ``(dim,)``); linear in the update."""
    if not 1 <= dim <= MAX_DIM:
        raise ValueError(f"sketch dim must be in [1, {MAX_DIM}]")
    out = torch.zeros(dim, dtype=torch.float64)
    for name in sorted(update):
        x = update[name].detach().to(torch.float32).reshape(-1)
        n = x.numel()
        signed = x * _signs(seed, name, n)
        whole = n - n % dim
        if whole:
            out += signed[:whole].view(-1, dim).sum(dim=0).double()
        if whole < n:
            out[: n - whole] += signed[whole:].double()
    return out.to(torch.float32)


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine of two sketches (0.0 when either is zero or not finite)."""
    a, b = a.double(), b.double()
    na, nb = float(a.norm()), float(b.norm())
    if not (na > 0 and nb > 0 and math.isfinite(na) and math.isfinite(nb)):
        return 0.0
    return max(-1.0, min(1.0, float(a @ b) / (na * nb)))


def sketch_to_json(s: Tensor) -> list[float]:
    """A sketch as a JSON list of floats (float32 precision, non-finite values as 0.0)."""
    return [float(v) if math.isfinite(v) else 0.0 for v in s.to(torch.float32).tolist()]


def sketch_from_json(values, *, dim: int | None = None) -> Tensor:
    """A sketch back from :func:`sketch_to_json`; ValueError on anything but a list of finite numbers."""
    if not isinstance(values, list) or not values or len(values) > MAX_DIM:
        raise ValueError("a sketch is a non-empty list of numbers")
    if dim is not None and len(values) != dim:
        raise ValueError(f"a sketch has {dim} values, not {len(values)}")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise ValueError("a sketch holds finite numbers only")
    return torch.tensor(values, dtype=torch.float32)


@dataclasses.dataclass(frozen=True)
class Earlier:
    """Something an update may not repeat: an earlier update or a public outer step."""

    label: str  # e.g. "task:17" or "outer step of round 3"
    sketch: Tensor | None = None
    sha256: str = ""


@dataclasses.dataclass(frozen=True)
class ReplayVerdict:
    replay: bool
    reason: str
    max_cosine: float
    closest: str


def replay_check(
    *,
    sha256: str,
    update_sketch: Tensor,
    earlier: list[Earlier],
    threshold: float = DEFAULT_THRESHOLD,
) -> ReplayVerdict:
    """Whether an update (its sha256 and sketch) repeats any of ``earlier``."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError("threshold must be in (0, 1]")
    best, closest = -1.0, ""
    for e in earlier:
        if sha256 and e.sha256 and e.sha256 == sha256:
            return ReplayVerdict(True, f"identical to {e.label} (same sha256)", 1.0, e.label)
        if e.sketch is None or e.sketch.shape != update_sketch.shape:
            continue
        c = cosine(update_sketch, e.sketch)
        if c > best:
            best, closest = c, e.label
    if best > threshold:
        return ReplayVerdict(True, f"replays {closest} (cosine {best:.4f} > {threshold:g})", best, closest)
    return ReplayVerdict(False, "", max(best, -1.0) if closest else 0.0, closest)
