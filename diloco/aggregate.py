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
    code: str = "accepted"


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
    w = 1.0 / k

    # Each row is scaled before it is added, so the running sum never exceeds the largest magnitude
    # (no overflow on finite inputs near float32's limit).
    def kernel(views, _stacked, out, _scratch):
        torch.mul(views[0], w, out=out)
        for v in views[1:]:
            out.add_(v, alpha=w)

    return _parallel_blocks(updates, names, kernel, need_stack=False)[0]


def _trim_count(k: int, trim_fraction: float) -> int:
    return min(int(math.floor(trim_fraction * k)), (k - 1) // 2)


def _trimmed_mean(updates, names, trim_fraction: float) -> dict[str, Tensor]:
    k = len(updates)
    t = _trim_count(k, trim_fraction)
    if t == 0:
        return _mean(updates, names)
    kept = k - 2 * t
    network = _sorting_network(k)

    # Sorted, then the middle rows averaged: never ``sum - max - min``, which cancels catastrophically in
    # float32 when the trimmed values are far larger than the kept ones.
    def kernel(_views, stacked, out, scratch):
        _sort_rows(stacked, network, scratch["tmp"][: out.numel()])
        torch.mul(stacked[t], 1.0 / kept, out=out)
        for row in range(t + 1, k - t):
            out.add_(stacked[row], alpha=1.0 / kept)

    return _parallel_blocks(updates, names, kernel, need_stack=True)[0]


def _median(updates, names) -> dict[str, Tensor]:
    k = len(updates)
    network = _sorting_network(k)

    def kernel(_views, stacked, out, scratch):
        _sort_rows(stacked, network, scratch["tmp"][: out.numel()])
        if k % 2:
            out.copy_(stacked[k // 2])
        else:  # halves first: (a + b) / 2 overflows for a, b near float32's limit
            torch.mul(stacked[k // 2 - 1], 0.5, out=out).add_(stacked[k // 2], alpha=0.5)

    return _parallel_blocks(updates, names, kernel, need_stack=True)[0]


def _tensor_norm(t: Tensor) -> float:
    """L2 norm of ``t``: NaN when it holds a NaN or an infinity, finite otherwise (float32's fast norm,
    redone in float64 only when a finite tensor's norm overflows float32)."""
    t = t.detach()
    n = float(torch.linalg.vector_norm(t.float()))
    if math.isfinite(n):
        return n
    if math.isinf(n):
        low, high = torch.aminmax(t)
        if math.isfinite(float(low)) and math.isfinite(float(high)):
            return float(torch.linalg.vector_norm(t, dtype=torch.float64))
    return math.nan


def update_norms(updates: list[dict[str, Tensor]]) -> list[float]:
    """Global L2 norm of each update over all its tensors (combined in float64): finite for every finite
    float32 input, NaN exactly when the update holds a NaN or an infinity."""
    return [math.sqrt(sum(_tensor_norm(t) ** 2 for t in u.values())) for u in updates]


def finite_rows(updates: list[dict[str, Tensor]]) -> list[int]:
    """Indices of the updates whose every value is finite."""
    return [i for i, n in enumerate(update_norms(updates)) if math.isfinite(n)]


def _norm_clipped_mean(updates, names, clip_norm: float | None) -> dict[str, Tensor]:
    k = len(updates)
    norms = update_norms(updates)  # float64: a huge finite row is scaled down, never zeroed by an overflow
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
      (never all of them) and average the rest; with ``floor(trim_fraction · k) == 0`` it is the mean.
    - ``median``: per coordinate median (the average of the two middle values when k is even).
    - ``norm_clipped_mean``: scale every update whose global norm exceeds ``clip_norm`` (default: the
      median norm) down to it, then average: one worker moves the result by at most clip/k.

    Every method equals its definition computed exactly and rounded once more to float32 (within a few
    float32 ulps of the kept values' magnitude) on any finite input, including values near float32's
    limit. Non-finite rows: an update holding any NaN or infinity is left out as a whole before
    aggregating (k counts the finite updates only); if none is finite, ``ValueError``. The result is
    therefore always finite.
    """
    if method not in METHODS:
        raise ValueError(f"unknown aggregator {method!r} (known: {', '.join(METHODS)})")
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError("trim_fraction must be in [0, 0.5)")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError("clip_norm must be > 0")
    names = _check(updates)
    finite = finite_rows(updates)
    if not finite:
        raise ValueError("no finite update to aggregate (every update holds a NaN or an infinity)")
    if len(finite) < len(updates):
        updates = [updates[i] for i in finite]
    if method == "mean":
        return _mean(updates, names)
    if method == "trimmed_mean":
        return _trimmed_mean(updates, names, trim_fraction)
    if method == "median":
        return _median(updates, names)
    return _norm_clipped_mean(updates, names, clip_norm)


def _loo_median_dots(updates: list[dict[str, Tensor]], names: list[str]) -> tuple[list[float], list[float]]:
    """For each update i: ``<u_i, c_i>`` and ``|c_i|²`` (float64), where ``c_i`` is the coordinate median
    of all the *other* updates, in one blockwise pass.

    Leaving the update out matters: with a handful of updates, an update's own values move the median
    towards it, which would give pure noise a sizeable cosine with a centre that includes it. The
    leave-one-out median is read off the sorted block by value: removing a value above the middle leaves
    the lower middle, and so on, which is right under ties too.
    """
    k = len(updates)
    network = _sorting_network(k)

    def dots(u: Tensor, s: Tensor) -> Tensor:
        """``[<u_i, c_i>, |c_i|²]`` for the rows ``u`` (k, n) given their sorted copy ``s``, where ``c_i``
        picks, per coordinate, one of two (k even) or three (k odd) candidates by comparing ``u_i`` with
        the middle. Written as masks times candidate differences so the work is matrix-vector products
        (``torch.where`` over a broadcast (k, n) block is several times slower)."""
        if k % 2 == 0:
            lo, hi = s[k // 2 - 1], s[k // 2]  # c_i = lo where u_i >= hi, else hi
            upper = (u >= hi).to(u.dtype)
            return torch.stack([u @ hi + (u * upper) @ (lo - hi), (hi @ hi).expand(k) + upper @ ((lo - hi) * (lo + hi))])
        h = k // 2
        below, mid, above = s[h - 1], s[h], s[h + 1]
        tie = (below + above) * 0.5  # c_i where u_i == mid
        if_low, if_high = (mid + above) * 0.5 - tie, (below + mid) * 0.5 - tie
        low, high = (u < mid).to(u.dtype), (u > mid).to(u.dtype)
        dot = u @ tie + (u * low) @ if_low + (u * high) @ if_high
        sq = (tie @ tie).expand(k) + low @ (if_low * (if_low + 2 * tie)) + high @ (if_high * (if_high + 2 * tie))
        return torch.stack([dot, sq])

    def kernel(views, stacked, _out, scratch):
        u = torch.stack(views)
        _sort_rows(stacked, network, scratch["tmp"][: stacked.shape[1]])
        acc = dots(u, stacked).to(torch.float64)
        if not bool(torch.isfinite(acc).all()):  # float32 overflowed on huge values: this block in float64
            acc = dots(u.to(torch.float64), stacked.to(torch.float64))
        scratch["acc"] = acc if scratch["acc"] is None else scratch["acc"] + acc

    _, accs = _parallel_blocks(updates, names, kernel, need_stack=True)
    total = sum((a for a in accs if a is not None), torch.zeros(2, k, dtype=torch.float64))
    return total[0].tolist(), total[1].tolist()


# Screening codes: ``non_finite`` is a fault of the update alone; the others judge it against the rest of
# the round, so they are only as trustworthy as the round (see ``diloco.round.Verdict.blamed``).
ACCEPTED, NON_FINITE, NORM_HIGH, NORM_LOW, DIRECTION = "accepted", "non_finite", "norm_high", "norm_low", "direction"


def _direction_pass(updates, names, alive, norms, cosines, min_cosine_ratio, opposed_cosine) -> dict:
    """Cosines of the ``alive`` updates with their leave-one-out median (written into ``cosines``) and
    the ones to reject, ``{index: (code, reason)}`` (see ``screen_updates``)."""
    dots, centre_sq = _loo_median_dots([updates[i] for i in alive], names)
    for j, i in enumerate(alive):
        denom = norms[i] * math.sqrt(max(centre_sq[j], 0.0))
        cosines[i] = max(-1.0, min(1.0, dots[j] / denom)) if denom > 0 else 0.0
    params = sum(t.numel() for t in updates[alive[0]].values())
    agreement = statistics.median(cosines[i] for i in alive)
    noise_level = 4.0 / math.sqrt(max(params, 1))
    if len(alive) >= 3 and agreement > noise_level:
        threshold = min_cosine_ratio * agreement
        return {i: (DIRECTION, f"direction disagrees with the round's robust centre (cosine {cosines[i]:.3f} "
                               f"with the others' coordinate median < {min_cosine_ratio:g} x their median "
                               f"cosine {agreement:.3f})")
                for i in alive if cosines[i] < threshold}
    if len(alive) == 2:
        return {i: (DIRECTION, f"direction opposes the only other update (cosine {cosines[i]:.3f} < "
                               f"{opposed_cosine:g}); cannot tell which is honest")
                for i in alive if cosines[i] < opposed_cosine}
    return {i: (DIRECTION, f"direction opposes the others (cosine {cosines[i]:.3f} with their coordinate "
                           f"median < {opposed_cosine:g})")
            for i in alive if cosines[i] < opposed_cosine}


def screen_updates(
    updates: list[dict[str, Tensor]],
    *,
    max_norm_ratio: float = 5.0,
    min_cosine_ratio: float = 0.4,
    opposed_cosine: float = -0.5,
    reference_norm: float | None = None,
) -> list[Screen]:
    """Judge each update against a robust centre of the round, returning one :class:`Screen` per update.

    Rejected, in this order:

    1. non-finite values (``non_finite``);
    2. a global norm more than ``max_norm_ratio`` times the median norm of the finite updates, or less
       than that median divided by it (``norm_high`` / ``norm_low``). With ``reference_norm`` (e.g. the
       median of recent rounds' accepted norms, out of this round's attackers' reach) the norm must also
       lie within the same ratio of it, unless that would refuse more than half of the finite updates (the
       reference bounds a minority; an honest majority outside it means it is stale, and is not refused);
    3. a direction that does not agree with the others (``direction``): the cosine of the update with the
       coordinate median of the *other* updates left after 1-2 (a leave-one-out median) is compared with
       ``min_cosine_ratio`` times the median of those cosines.

    Why this centre: a coordinate median cannot be moved far by a minority, even a colluding one sending
    the same vector, and leaving the judged update out means neither noise nor a colluder is judged
    against a centre it pulls on. Why this threshold: honest updates of one round are the same signal plus
    shard noise, so their cosines with the centre cluster around the median cosine (a majority is honest);
    0.4 of it leaves room for a shard 2.5 times as noisy as the typical one (at half, the drill of
    ``bench.attacks`` saw an honest update at 0.49 of the median turned away once two colluders pulled the
    median up), while noise orthogonal to the centre (cosine ~ 1/sqrt(parameters)) and anything opposed fall
    below it whenever the honest updates agree; what a noisier copy of the consensus slips in is then judged
    by the contribution score (``diloco.contributions``). When they do not agree (median cosine under ``4/sqrt(parameters)``, the noise level, or fewer
    than three updates left) direction cannot tell noise from work, and only a clearly opposed update
    (cosine below ``opposed_cosine``) is rejected; two updates that oppose each other are then both
    rejected (nothing tells which is honest).

    ``cosine`` is 0.0 when there is nothing to compare with; ``norm`` is -1.0 for a non-finite update
    (so a Screen is always JSON-safe).
    """
    if max_norm_ratio < 1:
        raise ValueError("max_norm_ratio must be >= 1")
    if not 0.0 <= min_cosine_ratio < 1.0:
        raise ValueError("min_cosine_ratio must be in [0, 1)")
    names = _check(updates) if updates else []
    k = len(updates)
    raw_norms = update_norms(updates)
    finite = [math.isfinite(n) for n in raw_norms]
    norms = [n if f else -1.0 for n, f in zip(raw_norms, finite, strict=True)]
    reasons: dict[int, tuple[str, str]] = {}
    for i in range(k):
        if not finite[i]:
            bad = next((n for n, t in updates[i].items() if not bool(torch.isfinite(t).all())), None)
            reasons[i] = (NON_FINITE, f"non-finite values in {bad}")
    ok = [i for i in range(k) if finite[i]]

    def check_norm(i: int, label: str, centre: float, into: dict | None = None) -> None:
        out = reasons if into is None else into
        n = norms[i]
        if centre > 0 and n > max_norm_ratio * centre:
            out[i] = (NORM_HIGH, f"norm {n:.4g} is {n / centre:.1f}x {label} {centre:.4g} (limit {max_norm_ratio:g}x)")
        elif centre > 0 and n < centre / max_norm_ratio:
            out[i] = (NORM_LOW, f"norm {n:.4g} is 1/{centre / max(n, 1e-300):.1f} of {label} {centre:.4g} "
                                f"(limit 1/{max_norm_ratio:g})")
        elif centre == 0 and n > 0:
            out[i] = (NORM_HIGH, f"norm {n:.4g} while {label} is 0")

    # The reference first: updates far from it do not get to move this round's median either. It may turn
    # away a minority only: when it would refuse more than half of the finite updates, the honest majority's
    # norms have moved away from it (or it is wrong), and refusing them would stall the run round after round.
    if reference_norm is not None and reference_norm > 0 and math.isfinite(reference_norm):
        by_reference: dict[int, tuple[str, str]] = {}
        for i in ok:
            check_norm(i, "the previous rounds' median accepted norm", float(reference_norm), into=by_reference)
        if 2 * len(by_reference) <= len(ok):
            reasons.update(by_reference)
            ok = [i for i in ok if i not in reasons]
    if ok:
        median = statistics.median(norms[i] for i in ok)
        for i in ok:
            check_norm(i, "the median norm", median)
    alive = [i for i in ok if i not in reasons]
    cosines = [0.0] * k
    while len(alive) >= 2:
        rejected = _direction_pass(updates, names, alive, norms, cosines, min_cosine_ratio, opposed_cosine)
        narrowed = len(alive) > 2 and len(rejected) > 1 and 2 * len(rejected) >= len(alive)
        if narrowed:
            # Half the round or more disagrees with its centre: a few large updates may be steering the
            # small round's centres, so only the worst goes and the centres are computed again without it.
            worst = min(rejected, key=lambda i: (cosines[i], i))
            rejected = {worst: rejected[worst]}
        reasons.update(rejected)
        alive = [i for i in alive if i not in rejected]
        if not narrowed:
            break
    screens = []
    for i in range(k):
        if i in reasons:
            code, reason = reasons[i]
            screens.append(Screen(False, reason, norms[i], cosines[i], code))
        else:
            screens.append(Screen(True, ACCEPTED, norms[i], cosines[i], ACCEPTED))
    return screens
