"""Spot re-computation (BOINC's replication): two workers train the same task; do their updates agree?

The server re-issues a sampled fraction of a round's tasks to a second worker with the same checkpoint,
shard, seed and inner settings. Two honest workers then compute the same H steps of AdamW from the same
weights on the same batches, so their pseudo-gradients differ only by floating-point rounding (kernel
choice, thread count, TF32 or fused kernels on a GPU) and by the codec's quantisation of that difference.
A free-rider that uploads anything else (a public outer step, an earlier update, noise at a plausible norm,
another shard's work) disagrees with an honest replica.

Agreement is judged on the decoded updates, with float64 accumulation over every tensor:

    cosine(Δ_a, Δ_b) ≥ ``cosine``        and        |‖Δ_a‖ − ‖Δ_b‖| / max(‖Δ_a‖, ‖Δ_b‖) ≤ ``norm_rel``

Measured on CPU with ``bench/replica_tolerance.py`` (byte-level GPT 2×64, H=50, int8): the same seed on
the same machine is bitwise identical, and with another thread count agrees to cosine 1.000000 and a norm
difference of 1e-7. Other honest work from the same weights is far closer than one might guess, since
early updates all learn the same byte statistics: another seed on the same shard reaches cosine 0.81
(0.92 for a 1×32 model at H=10), another shard 0.76 (0.92); the last public outer step 0.47, the worker's
own update of the last round 0.45, noise at the same norm 0. The defaults (cosine ≥ 0.98, norms within
5%) sit between the two with room for fp32 rounding differences between machines. Mixed precision is
another computation altogether (bf16 autocast against fp32: cosine 0.59), so the server only pairs
workers with the same device (``training.services.replicas``).

When a pair disagrees, :func:`favoured` names the one to keep: the one the round's own checks (screening,
replay and score) accepted when only one was, else the one with the larger gain on its own shard when
both were scored, else the one closer to the robust centre (the coordinate median of the round's other
updates). Nothing here knows about Django.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from collections.abc import Hashable, Mapping, Sequence

import torch
from torch import Tensor

DEFAULT_COSINE = 0.98
DEFAULT_NORM_REL = 0.05
MAX_FRACTION = 0.5


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """How close two updates of the same task must be to agree."""

    cosine: float = DEFAULT_COSINE
    norm_rel: float = DEFAULT_NORM_REL

    def __post_init__(self):
        if not -1.0 <= self.cosine <= 1.0 or not 0.0 <= self.norm_rel <= 1.0:
            raise ValueError("cosine must be within [-1, 1] and norm_rel within [0, 1]")


@dataclasses.dataclass(frozen=True)
class Agreement:
    agreed: bool
    cosine: float | None
    norm_rel: float | None
    reason: str

    def as_json(self) -> dict:
        def r(x):
            return None if x is None or not math.isfinite(x) else round(x, 6)

        return {"agreed": self.agreed, "cosine": r(self.cosine), "norm_rel": r(self.norm_rel), "reason": self.reason}


def _dot_and_norms(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> tuple[float, float, float]:
    dot = na = nb = 0.0
    for name, ta in a.items():
        x = ta.detach().reshape(-1).to(torch.float64)
        y = b[name].detach().reshape(-1).to(torch.float64)
        dot += float(x @ y)
        na += float(x @ x)
        nb += float(y @ y)
    return dot, math.sqrt(na), math.sqrt(nb)


def compare(a: Mapping[str, Tensor], b: Mapping[str, Tensor], *, tolerance: Tolerance = Tolerance()) -> Agreement:
    """Whether two decoded updates of the same task agree (see the module docstring)."""
    if set(a) != set(b) or any(a[k].shape != b[k].shape for k in a):
        return Agreement(False, None, None, "the two updates have different tensors")
    dot, na, nb = _dot_and_norms(a, b)
    if not all(math.isfinite(x) for x in (dot, na, nb)):
        return Agreement(False, None, None, "an update is not finite")
    if na == 0.0 or nb == 0.0:
        return Agreement(False, None, None, "an update is all zeros, which no training gives")
    cos = dot / (na * nb)
    rel = abs(na - nb) / max(na, nb)
    if cos < tolerance.cosine:
        return Agreement(False, cos, rel, f"cosine {cos:.4f} is under {tolerance.cosine:g}")
    if rel > tolerance.norm_rel:
        return Agreement(False, cos, rel, f"norms differ by {rel:.1%}, more than {tolerance.norm_rel:.0%}")
    return Agreement(True, cos, rel, f"cosine {cos:.4f}, norms within {rel:.2%}")


def sample_shards(*, seed: int, shards: int, fraction: float) -> list[int]:
    """The shards of a round that get a replica: each independently with probability ``fraction``, drawn
    from ``seed`` (so the choice is reproducible by whoever knows the seed, and unpredictable to whoever
    does not). With few shards per round a fixed share would round to none; a draw per shard checks a
    ``fraction`` of all tasks over the run."""
    if not 0.0 <= fraction <= MAX_FRACTION:
        raise ValueError(f"fraction must be within [0, {MAX_FRACTION}]")
    if fraction == 0.0 or shards <= 0:
        return []
    digest = hashlib.sha256(f"agora:replicas:{seed}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    return [s for s in range(shards) if rng.random() < fraction]


def robust_centre(others: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor] | None:
    """The coordinate median of ``others`` (None when there are none): a minority of them cannot move it."""
    if not others:
        return None
    return {k: torch.stack([o[k].float() for o in others]).median(dim=0).values for k in others[0]}


def centre_cosine(update: Mapping[str, Tensor], centre: Mapping[str, Tensor] | None) -> float | None:
    if centre is None:
        return None
    dot, na, nb = _dot_and_norms(update, centre)
    if na == 0.0 or nb == 0.0 or not math.isfinite(dot):
        return None
    return dot / (na * nb)


@dataclasses.dataclass(frozen=True)
class Side:
    """What the round knows about one member of a disagreeing pair."""

    id: Hashable
    accepted: bool  # passed screening and the contribution checks
    own_gain: float | None = None  # loss drop on its own shard's windows, when scored
    centre_cosine: float | None = None  # cosine with the robust centre of the round's other updates


def favoured(a: Side, b: Side) -> tuple[Hashable, str]:
    """The id of the member of a disagreeing pair to keep, and why; ``a`` (the earlier task) wins ties."""
    if a.accepted != b.accepted:
        keep = a if a.accepted else b
        return keep.id, "the round's checks accepted only it"
    if a.own_gain is not None and b.own_gain is not None and math.isfinite(a.own_gain) \
            and math.isfinite(b.own_gain) and a.own_gain != b.own_gain:
        keep = a if a.own_gain > b.own_gain else b
        return keep.id, f"it learns its shard better (loss drop {keep.own_gain:.4f})"
    if a.centre_cosine is not None and b.centre_cosine is not None and a.centre_cosine != b.centre_cosine:
        keep = a if a.centre_cosine > b.centre_cosine else b
        return keep.id, f"it is closer to the round's median update (cosine {keep.centre_cosine:.3f})"
    return a.id, "nothing tells them apart; the earlier task is kept"


__all__ = ["Agreement", "Side", "Tolerance", "centre_cosine", "compare", "favoured", "robust_centre",
           "sample_shards"]
