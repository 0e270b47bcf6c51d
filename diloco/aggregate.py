"""Aggregating k pseudo-gradients into one, and screening them first.

Every method walks the tensors in blocks of ``BLOCK`` elements, stacking the k workers' block views
(which fit in cache) instead of materialising a k × parameters matrix, so memory stays at one
update's worth beyond the inputs and the inputs are read once.
"""

from __future__ import annotations

import dataclasses
import math
import statistics

import torch
from torch import Tensor

METHODS = ("mean", "trimmed_mean", "median", "norm_clipped_mean")
BLOCK = 1 << 15


@dataclasses.dataclass(frozen=True)
class Screen:
    accepted: bool
    reason: str
    norm: float
    cosine: float


def _check(updates: list[dict[str, Tensor]]) -> list[str]:
    if not updates:
        raise ValueError("no updates to aggregate")
    names = list(updates[0])
    for i, u in enumerate(updates[1:], start=1):
        if set(u) != set(names):
            raise ValueError(f"update {i} has different tensor names from update 0")
        for n in names:
            if u[n].shape != updates[0][n].shape:
                raise ValueError(f"update {i} tensor {n} has shape {tuple(u[n].shape)}, expected {tuple(updates[0][n].shape)}")
    return names


def _flat(t: Tensor) -> Tensor:
    return t.detach().to(torch.float32).reshape(-1).contiguous()


def _blocks(n: int):
    for start in range(0, n, BLOCK):
        yield start, min(n, start + BLOCK)


def _reduce(updates, names, block_fn) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    k = len(updates)
    buf = torch.empty(k, BLOCK)
    for name in names:
        flats = [_flat(u[name]) for u in updates]
        shape = updates[0][name].shape
        result = torch.empty(flats[0].numel())
        for s, e in _blocks(result.numel()):
            stacked = torch.stack([f[s:e] for f in flats], out=buf[:, : e - s])
            block_fn(stacked, result[s:e])
        out[name] = result.view(shape)
    return out


def _mean(updates, names) -> dict[str, Tensor]:
    k = len(updates)
    out: dict[str, Tensor] = {}
    for name in names:
        flats = [_flat(u[name]) for u in updates]
        result = torch.empty(flats[0].numel())
        for s, e in _blocks(result.numel()):
            r = result[s:e]
            r.copy_(flats[0][s:e])
            for f in flats[1:]:
                r.add_(f[s:e])
            r.div_(k)
        out[name] = result.view(updates[0][name].shape)
    return out


def _trimmed_mean(updates, names, trim_fraction: float) -> dict[str, Tensor]:
    k = len(updates)
    t = min(int(math.floor(trim_fraction * k)), (k - 1) // 2)
    if t == 0:
        return _mean(updates, names)
    kept = k - 2 * t

    def fn(stacked: Tensor, out: Tensor) -> None:
        if t == 1:
            torch.sum(stacked, dim=0, out=out)
            out.sub_(stacked.amax(dim=0)).sub_(stacked.amin(dim=0)).div_(kept)
        else:
            torch.sum(stacked.sort(dim=0).values[t : k - t], dim=0, out=out)
            out.div_(kept)

    return _reduce(updates, names, fn)


def _median(updates, names) -> dict[str, Tensor]:
    k = len(updates)

    def fn(stacked: Tensor, out: Tensor) -> None:
        if k % 2:
            out.copy_(stacked.median(dim=0).values)
        else:
            mid = stacked.sort(dim=0).values[k // 2 - 1 : k // 2 + 1]
            torch.mean(mid, dim=0, out=out)

    return _reduce(updates, names, fn)


def update_norms(updates: list[dict[str, Tensor]]) -> list[float]:
    """Global L2 norm of each update over all its tensors (accumulated in float64)."""
    return [math.sqrt(sum(float(torch.linalg.vector_norm(_flat(t), dtype=torch.float64)) ** 2
                          for t in u.values())) for u in updates]


def _norm_clipped_mean(updates, names, clip_norm: float | None) -> dict[str, Tensor]:
    k = len(updates)
    norms = update_norms(updates)
    clip = statistics.median(norms) if clip_norm is None else float(clip_norm)
    weights = [(min(1.0, clip / n) if n > 0 else 1.0) / k for n in norms]
    out: dict[str, Tensor] = {}
    for name in names:
        flats = [_flat(u[name]) for u in updates]
        result = torch.empty(flats[0].numel())
        for s, e in _blocks(result.numel()):
            r = result[s:e]
            torch.mul(flats[0][s:e], weights[0], out=r)
            for f, w in zip(flats[1:], weights[1:], strict=True):
                r.add_(f[s:e], alpha=w)
        out[name] = result.view(updates[0][name].shape)
    return out


def aggregate(
    updates: list[dict[str, Tensor]],
    method: str,
    *,
    trim_fraction: float = 0.2,
    clip_norm: float | None = None,
) -> dict[str, Tensor]:
    """Combine k updates coordinate-wise into one (float32).

    - ``mean``: the plain average (what DiLoCo uses with honest workers).
    - ``trimmed_mean``: per coordinate, drop the ``floor(trim_fraction · k)`` largest and smallest values
      (never all of them) and average the rest.
    - ``median``: per coordinate median (the average of the two middle values when k is even).
    - ``norm_clipped_mean``: scale every update whose global norm exceeds ``clip_norm`` (default: the
      median norm) down to it, then average: one worker moves the result by at most clip/k.
    """
    if method not in METHODS:
        raise ValueError(f"unknown aggregator {method!r} (known: {', '.join(METHODS)})")
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError("trim_fraction must be in [0, 0.5)")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError("clip_norm must be > 0")
    names = _check(updates)
    if method == "mean":
        return _mean(updates, names)
    if method == "trimmed_mean":
        return _trimmed_mean(updates, names, trim_fraction)
    if method == "median":
        return _median(updates, names)
    return _norm_clipped_mean(updates, names, clip_norm)


def _gram(updates: list[dict[str, Tensor]], names: list[str]) -> Tensor:
    k = len(updates)
    gram = torch.zeros(k, k, dtype=torch.float64)
    buf = torch.empty(k, BLOCK)
    for name in names:
        flats = [_flat(u[name]) for u in updates]
        for s, e in _blocks(flats[0].numel()):
            stacked = torch.stack([f[s:e] for f in flats], out=buf[:, : e - s])
            gram += (stacked @ stacked.T).to(torch.float64)
    return gram


def _cosine_with_others(gram: Tensor, i: int, others: list[int]) -> float:
    others = [j for j in others if j != i]
    if not others:
        return 0.0
    dot = float(gram[i, others].sum())
    sum_sq = float(gram[others][:, others].sum())
    denom = math.sqrt(max(float(gram[i, i]), 0.0)) * math.sqrt(max(sum_sq, 0.0))
    return max(-1.0, min(1.0, dot / denom)) if denom > 0 else 0.0


def screen_updates(
    updates: list[dict[str, Tensor]], *, max_norm_ratio: float = 5.0, min_cosine: float = -0.5
) -> list[Screen]:
    """Validate each update against the others, returning one :class:`Screen` per update, in order.

    Rejected, in this order: non-finite values; a global norm more than ``max_norm_ratio`` times the
    median norm of the finite updates, or less than that median divided by it; a direction opposing the
    others (cosine with the sum of the other accepted updates below ``min_cosine``). Direction is checked
    iteratively, most opposed first, so one attacker does not drag honest updates down; when only two
    remain and they oppose each other, both are rejected (there is no majority to tell which is honest).
    ``cosine`` is 0.0 when there is nothing to compare with; ``norm`` is -1.0 for a non-finite update
    (so a Screen is always JSON-safe).
    """
    if max_norm_ratio < 1:
        raise ValueError("max_norm_ratio must be >= 1")
    names = _check(updates) if updates else []
    k = len(updates)
    finite = [all(bool(torch.isfinite(t).all()) for t in u.values()) for u in updates]
    reasons: dict[int, str] = {}
    for i in range(k):
        if not finite[i]:
            bad = next(n for n, t in updates[i].items() if not bool(torch.isfinite(t).all()))
            reasons[i] = f"non-finite values in {bad}"
    ok = [i for i in range(k) if finite[i]]
    gram = torch.zeros(k, k, dtype=torch.float64)
    if ok:
        sub = _gram([updates[i] for i in ok], names)
        idx = torch.tensor(ok)
        gram[idx[:, None], idx[None, :]] = sub
    norms = [math.sqrt(max(float(gram[i, i]), 0.0)) if finite[i] else -1.0 for i in range(k)]
    if ok:
        median = statistics.median(norms[i] for i in ok)
        for i in ok:
            n = norms[i]
            if median > 0 and n > max_norm_ratio * median:
                reasons[i] = f"norm {n:.4g} is {n / median:.1f}x the median norm {median:.4g} (limit {max_norm_ratio:g}x)"
            elif median > 0 and n < median / max_norm_ratio:
                reasons[i] = f"norm {n:.4g} is 1/{median / max(n, 1e-300):.1f} of the median norm {median:.4g} (limit 1/{max_norm_ratio:g})"
            elif median == 0 and n > 0:
                reasons[i] = f"norm {n:.4g} while the median norm is 0"
    alive = [i for i in ok if i not in reasons]
    rejected_cosine: dict[int, float] = {}
    while len(alive) >= 2:
        cosines = {i: _cosine_with_others(gram, i, alive) for i in alive}
        worst = min(alive, key=lambda i: (cosines[i], i))
        if cosines[worst] >= min_cosine:
            break
        if len(alive) == 2:
            for i in alive:
                rejected_cosine[i] = cosines[i]
                reasons[i] = (f"direction opposes the only other update (cosine {cosines[i]:.3f} < {min_cosine:g}); "
                              "cannot tell which is honest")
            alive = []
            break
        rejected_cosine[worst] = cosines[worst]
        reasons[worst] = f"direction opposes the others (cosine {cosines[worst]:.3f} with their mean < {min_cosine:g})"
        alive.remove(worst)
    screens = []
    for i in range(k):
        if i in rejected_cosine:
            cosine = rejected_cosine[i]
        else:
            cosine = _cosine_with_others(gram, i, alive) if finite[i] else 0.0
        if i in reasons:
            screens.append(Screen(False, reasons[i], norms[i], cosine))
        else:
            screens.append(Screen(True, "accepted", norms[i], cosine))
    return screens
