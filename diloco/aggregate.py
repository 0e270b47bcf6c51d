"""Aggregating k pseudo-gradients into one, and screening them first.

Every method walks the tensors in blocks of ``BLOCK`` elements spread over torch's thread count,
combining the k workers' block views in cache (a sorting network of element-wise min/max for median
and trimmed mean) instead of materialising a k × parameters matrix: memory stays at one update's worth
beyond the inputs (plus a k × BLOCK scratch per thread), and the inputs are read once.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

METHODS = ("mean", "trimmed_mean", "median", "norm_clipped_mean")
BLOCK = 1 << 15  # 32768 elements: torch's intra-op grain, so each block op runs on one thread


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


def _sorting_network(k: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sort comparators (i < j: min to i) for k rows.

    Built for the next power of two; comparators that touch the (virtual, +inf) padding rows are
    no-ops and are dropped, so the network sorts exactly k rows. k = 8 needs 19 comparators.
    """
    n = 1 << max(0, (k - 1).bit_length())
    pairs: list[tuple[int, int]] = []

    def merge(lo: int, hi: int, r: int) -> None:
        step = r * 2
        if step < hi - lo:
            merge(lo, hi, step)
            merge(lo + r, hi, step)
            pairs.extend((i, i + r) for i in range(lo + r, hi - r, step))
        else:
            pairs.append((lo, lo + r))

    def sort(lo: int, hi: int) -> None:
        if hi - lo >= 1:
            mid = lo + (hi - lo) // 2
            sort(lo, mid)
            sort(mid + 1, hi)
            merge(lo, hi, 1)

    sort(0, n - 1)
    return [(i, j) for i, j in pairs if j < k]


def _sort_rows(stacked: Tensor, network: list[tuple[int, int]], tmp: Tensor) -> None:
    """Sort a (k, n) block along dim 0 in place with element-wise min/max (much faster than torch.sort
    along a short leading dimension)."""
    for i, j in network:
        a, b = stacked[i], stacked[j]
        torch.minimum(a, b, out=tmp)
        torch.maximum(a, b, out=b)
        a.copy_(tmp)


def _parallel_blocks(updates, names, kernel, *, need_stack: bool, out_dtype=torch.float32):
    """Run ``kernel(views, stacked, out_block, scratch)`` over every block of every tensor.

    Blocks are at most ``BLOCK`` elements, below torch's intra-op parallel grain, and are spread over
    ``torch.get_num_threads()`` Python threads (torch releases the GIL inside its kernels), each with its
    own (k, BLOCK) scratch buffer. Returns ``{name: result}`` shaped like the inputs.
    """
    k = len(updates)
    flats = {name: [_flat(u[name]) for u in updates] for name in names}
    outs = {name: torch.empty(flats[name][0].numel(), dtype=out_dtype) for name in names}
    tasks = [(name, s, min(outs[name].numel(), s + BLOCK))
             for name in names for s in range(0, outs[name].numel(), BLOCK)]
    n_threads = max(1, min(torch.get_num_threads(), len(tasks)))

    def work(part: list[tuple[str, int, int]]) -> object:
        scratch = {"buf": torch.empty(k, BLOCK) if need_stack else None, "tmp": torch.empty(BLOCK), "acc": None}
        for name, s, e in part:
            views = [f[s:e] for f in flats[name]]
            stacked = torch.stack(views, out=scratch["buf"][:, : e - s]) if need_stack else None
            kernel(views, stacked, outs[name][s:e], scratch)
        return scratch["acc"]

    size = math.ceil(len(tasks) / n_threads)
    parts = [tasks[i : i + size] for i in range(0, len(tasks), size)]
    if len(parts) == 1:
        accs = [work(parts[0])]
    else:
        with ThreadPoolExecutor(max_workers=len(parts)) as pool:
            accs = list(pool.map(work, parts))
    return {name: outs[name].view(updates[0][name].shape) for name in names}, accs


def _mean(updates, names) -> dict[str, Tensor]:
    k = len(updates)

    def kernel(views, _stacked, out, _scratch):
        torch.add(views[0], views[1], out=out) if k > 1 else out.copy_(views[0])
        for v in views[2:]:
            out.add_(v)
        out.mul_(1.0 / k)

    return _parallel_blocks(updates, names, kernel, need_stack=False)[0]


def _trimmed_mean(updates, names, trim_fraction: float) -> dict[str, Tensor]:
    k = len(updates)
    t = min(int(math.floor(trim_fraction * k)), (k - 1) // 2)
    if t == 0:
        return _mean(updates, names)
    kept = k - 2 * t
    network = _sorting_network(k)

    def kernel(_views, stacked, out, scratch):
        if t == 1:
            torch.sum(stacked, dim=0, out=out)
            out.sub_(stacked.amax(dim=0)).sub_(stacked.amin(dim=0)).mul_(1.0 / kept)
        else:
            _sort_rows(stacked, network, scratch["tmp"][: out.numel()])
            torch.sum(stacked[t : k - t], dim=0, out=out)
            out.mul_(1.0 / kept)

    return _parallel_blocks(updates, names, kernel, need_stack=True)[0]


def _median(updates, names) -> dict[str, Tensor]:
    k = len(updates)
    network = _sorting_network(k)

    def kernel(_views, stacked, out, scratch):
        _sort_rows(stacked, network, scratch["tmp"][: out.numel()])
        if k % 2:
            out.copy_(stacked[k // 2])
        else:
            torch.add(stacked[k // 2 - 1], stacked[k // 2], out=out).mul_(0.5)

    return _parallel_blocks(updates, names, kernel, need_stack=True)[0]


def update_norms(updates: list[dict[str, Tensor]]) -> list[float]:
    """Global L2 norm of each update over all its tensors (per-tensor norms combined in float64)."""
    return [math.sqrt(sum(float(torch.linalg.vector_norm(t.detach().float())) ** 2 for t in u.values()))
            for u in updates]


def _norm_clipped_mean(updates, names, clip_norm: float | None) -> dict[str, Tensor]:
    k = len(updates)
    norms = update_norms(updates)
    clip = statistics.median(norms) if clip_norm is None else float(clip_norm)
    weights = [(min(1.0, clip / n) if n > 0 else 1.0) / k for n in norms]

    def kernel(views, _stacked, out, _scratch):
        torch.mul(views[0], weights[0], out=out)
        for v, w in zip(views[1:], weights[1:], strict=True):
            out.add_(v, alpha=w)

    return _parallel_blocks(updates, names, kernel, need_stack=False)[0]


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
    """The k × k matrix of dot products between updates (float64), in one blockwise pass."""

    def kernel(_views, stacked, _out, scratch):
        g = (stacked @ stacked.T).to(torch.float64)
        scratch["acc"] = g if scratch["acc"] is None else scratch["acc"] + g

    _, accs = _parallel_blocks(updates, names, kernel, need_stack=True)
    k = len(updates)
    return sum((a for a in accs if a is not None), torch.zeros(k, k, dtype=torch.float64))


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
    # One pass over the data: the Gram matrix (accumulated in float64, so squares of float32 values cannot
    # overflow) has a non-finite diagonal exactly when an update holds a NaN or an infinity. Only the
    # rejected updates are scanned again, to name the offending tensor.
    gram = _gram(updates, names) if updates else torch.zeros(0, 0, dtype=torch.float64)
    finite = [bool(torch.isfinite(gram[i, i])) for i in range(k)]
    reasons: dict[int, str] = {}
    for i in range(k):
        if not finite[i]:
            bad = next((n for n, t in updates[i].items() if not bool(torch.isfinite(t).all())), None)
            reasons[i] = f"non-finite values in {bad}" if bad else "values so large that the norm overflows"
    ok = [i for i in range(k) if finite[i]]
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
