"""Scoring one contribution: does a worker's update teach the model the data it was given?

Gauntlet-style (Templar): apply the pseudo-gradient Δ to the round's base weights (θ − scale·Δ; scale 1 gives
back the worker's own trained weights) and measure the loss on a few fixed windows of the worker's own data
and of data it was not given (other shards), before and after. The own windows are windows the task trained
on (:func:`trained_windows`: the server redraws the task's batches from its seed and picks some by a secret
seed), so an honest worker's update has learnt them by heart while anything made without the work has not;
were the batches drawn otherwise (another agent version), they are still random windows of its own shard.

Per window w the gain is ``loss_θ(w) − loss_{θ−scale·Δ}(w)``. Two things make a raw own-versus-other gain
too noisy to judge one update by: shards differ in how much *any* step teaches them (one shard's text is
easier), and every update teaches every shard the same common statistics. So each window's gain is taken
relative to the gain of the round's **centre** on the same window (the coordinate median of the round's
scored updates, which a minority cannot move), and the score is a difference of differences:

    d(w)  = gain_Δ(w) − gain_centre(w)                  (paired on the same window)
    score = mean_{w ∈ own windows} d(w) − mean_{w ∈ other shards} d(w)
    z     = score / its standard error over the windows

An honest update beats the centre on its own windows (the centre holds only a share of that work) and
trails it elsewhere (the centre is the better generic step): score > 0. An update that copies the consensus
("a little is enough"), another shard's work, a public step or noise has no own-window advantage: its z is
about standard normal, so ``min_z`` (2) lets about one in 44 through by chance, where honest updates sit
near 5 (down to about 2.3 in the drill, ``bench.attacks``). A near-copy of the consensus has a tiny standard
error, so chance can hand it a large z; its *score*, though, is a sliver of an honest update's, so an update
must also score at least ``min_share`` (0.2) of the round's median score (when the median update's own
z reaches ``min_z``: somebody has specialised).

The verdict (:func:`judge`) asks ``z ≥ min_z`` and that share in a round where the test can tell work apart:
the median z of the round's scored updates (an honest majority's, which a minority cannot move) is at least
``min_round_z`` (3). A round with fewer than 3 scored updates (a centre of one or two is the updates
themselves), a round whose median z is lower (a few inner steps from a random start: nobody has specialised
yet), and a run's first round (no public step yet; honest z's from a random start reach down to about 1.3)
are judged by the **fallback rule**, which still pays only for work: the update must lower the loss on its
own windows (by ``z ≥ min_z`` over the windows), must not learn other data more than four times better than
its own (``own_gain ≥ (1 − tolerance) · other_gain``), must keep the share of the median score where there
is a centre, and must beat, window by window with ``z ≥ min_z`` and by at least ``min_share`` of its gain
(noise on top of it can beat it by a hair on every window, by luck), its own **share of the last public
outer step** P = θ_{r−1} − θ_r: the projection ``(⟨Δ, P⟩ / |P|²) · P``, the part of the update anyone could have
made from the public checkpoints, at the update's own scale (a multiple of the step, the step with noise
added, are no better than that part of themselves). An update that has trained on its windows learns them
better than its generic public component does; a free-rider has nothing on those windows beyond it. (The
step itself, with the outer momentum behind it, is often larger than any one update early in a run and
lowers every loss more; comparing with it at full size would refuse honest work.) In a first round there
is nothing public to copy: a free-rider has only noise (no gain) or a copy of other workers' updates of the
same round (no share of the score).

Everything here is deterministic for the same seeds and weights; the windows come from a seeded generator
so the server can draw them from a secret the workers do not know.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics

import torch
from torch import Tensor

from diloco.models import model_with_weights

# The score must stand this many standard errors above zero: an update with nothing of its own (z about
# standard normal) passes one time in 44; honest updates scored on windows they trained on sit near 5.
DEFAULT_MIN_Z = 2.0
# ... and be at least this share of the round's median score: a near-copy of the consensus has a tiny
# standard error, so chance alone can give it a large z, but never a sizeable score.
DEFAULT_MIN_SHARE = 0.2
# The median z a round needs before a low z is held against an update (a first round from a random start
# sits near 2.5: every update learns the same byte statistics and specialisation is faint).
DEFAULT_MIN_ROUND_Z = 3.0
# Without a centre: an update may learn the other data at most 1 / (1 - tolerance) times better than its own.
DEFAULT_TOLERANCE = 0.75
# A centre needs this many scored updates (with fewer, the median is the updates themselves).
MIN_CENTRE = 3


@dataclasses.dataclass(frozen=True)
class Gains:
    """Losses before and after applying one update, on its own shard and on other data, as means; with
    the per-window gains (``own``, ``other``: before − after per window) when they were measured."""

    own_before: float
    own_after: float
    other_before: float
    other_after: float
    own: Tensor | None = dataclasses.field(default=None, compare=False, repr=False)
    other: Tensor | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def own_gain(self) -> float:
        return self.own_before - self.own_after

    @property
    def other_gain(self) -> float:
        return self.other_before - self.other_after


@dataclasses.dataclass(frozen=True)
class Score:
    passed: bool
    reason: str
    own_gain: float | None
    other_gain: float | None
    score: float | None
    own_before: float | None = None
    own_after: float | None = None
    other_before: float | None = None
    other_after: float | None = None
    z: float | None = None
    centre_own_gain: float | None = None
    centre_other_gain: float | None = None
    public_own_gain: float | None = None

    def as_json(self) -> dict:
        """JSON-safe (non-finite numbers become None), rounded to 6 significant digits."""

        def clean(x):
            return float(f"{x:.6g}") if x is not None and math.isfinite(x) else None

        return {"passed": self.passed, "reason": self.reason, "own_gain": clean(self.own_gain),
                "other_gain": clean(self.other_gain), "score": clean(self.score), "z": clean(self.z),
                "centre_own_gain": clean(self.centre_own_gain), "centre_other_gain": clean(self.centre_other_gain),
                "public_own_gain": clean(self.public_own_gain),
                "own_before": clean(self.own_before), "own_after": clean(self.own_after),
                "other_before": clean(self.other_before), "other_after": clean(self.other_after)}


def score_windows(tokens: Tensor, *, count: int, seq_len: int, seed: int) -> Tensor:
    """``count`` windows of ``seq_len + 1`` tokens at seeded random offsets of ``tokens``: (count, seq_len + 1)."""
    if count < 1:
        raise ValueError("count must be >= 1")
    n = tokens.numel()
    if n < seq_len + 1:
        raise ValueError(f"scoring data has {n} tokens, needs at least seq_len + 1 = {seq_len + 1}")
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, n - seq_len, (count,), generator=gen)
    return tokens[starts[:, None] + torch.arange(seq_len + 1)]


def trained_windows(tokens: Tensor, *, steps: int, batch_size: int, seq_len: int, seed: int, count: int,
                    pick_seed: int) -> Tensor:
    """``count`` of the windows a task trained on: ``diloco.inner.inner_train`` draws ``steps`` batches of
    ``batch_size`` windows of ``seq_len + 1`` tokens from ``tokens`` with ``diloco.data.sample_batch`` and a
    generator seeded with the task's ``seed``; these are drawn the same way, and ``count`` of them (all, when
    there are fewer) picked by ``pick_seed``, the round's secret. Shape ``(count, seq_len + 1)``."""
    if count < 1 or steps < 1 or batch_size < 1:
        raise ValueError("count, steps and batch_size must be >= 1")
    n = tokens.numel()
    if n < seq_len + 1:
        raise ValueError(f"scoring data has {n} tokens, needs at least seq_len + 1 = {seq_len + 1}")
    gen = torch.Generator().manual_seed(int(seed))
    # One draw per step, exactly as sample_batch makes them (a single draw of steps x batch_size would not
    # consume the generator the same way).
    starts = torch.cat([torch.randint(0, n - seq_len, (batch_size,), generator=gen) for _ in range(steps)])
    picked = torch.randperm(starts.numel(), generator=torch.Generator().manual_seed(int(pick_seed)))[:count]
    return tokens[starts[picked.sort().values][:, None] + torch.arange(seq_len + 1)]


def window_losses(
    arch: str,
    config: dict,
    state: dict[str, Tensor],
    windows: Tensor,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> Tensor:
    """Next-token cross-entropy of the model with weights ``state`` on each of ``windows`` (float32,
    shape ``(len(windows),)``), in batches of ``batch_size`` windows (under autocast when
    ``autocast_dtype`` is given; the loss is reduced in fp32)."""
    return _per_window_losses(arch, config, state, windows, device=device, autocast_dtype=autocast_dtype,
                              batch_size=batch_size)


def windows_loss(arch: str, config: dict, state: dict[str, Tensor], windows: Tensor, **kw) -> float:
    """Mean next-token cross-entropy over ``windows`` (see :func:`window_losses`)."""
    return float(window_losses(arch, config, state, windows, **kw).mean())


def applied(base: dict[str, Tensor], update: dict[str, Tensor], scale: float = 1.0) -> dict[str, Tensor]:
    """θ − scale·Δ, in float32 (the weights the update leads to at that step size)."""
    missing = sorted(set(base) - set(update))
    if missing:
        raise ValueError(f"update lacks tensors of the model: {', '.join(missing[:3])}")
    return {k: base[k].float() - float(scale) * update[k].to(torch.float32) for k in base}


def update_gains(
    *,
    arch: str,
    config: dict,
    base: dict[str, Tensor],
    update: dict[str, Tensor],
    own: Tensor,
    other: Tensor,
    own_before: Tensor | None = None,
    other_before: Tensor | None = None,
    scale: float = 1.0,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> Gains:
    """Per-window gains on the ``own`` and ``other`` windows of applying ``update`` at ``scale`` to
    ``base``. ``own_before`` / ``other_before``: the base weights' per-window losses on them, when already
    known (they depend on the base weights only). The after-losses come from one batched pass."""
    kw = {"device": device, "autocast_dtype": autocast_dtype}
    if own_before is None:
        own_before = window_losses(arch, config, base, own, **kw)
    if other_before is None:
        other_before = window_losses(arch, config, base, other, **kw)
    after_state = applied(base, update, scale)
    if own.shape[1] == other.shape[1]:
        per = window_losses(arch, config, after_state, torch.cat([own, other]), **kw)
        own_after, other_after = per[: own.shape[0]], per[own.shape[0]:]
    else:
        own_after = window_losses(arch, config, after_state, own, **kw)
        other_after = window_losses(arch, config, after_state, other, **kw)
    return Gains(float(own_before.mean()), float(own_after.mean()), float(other_before.mean()),
                 float(other_after.mean()), own=own_before - own_after, other=other_before - other_after)


@torch.no_grad()
def _per_window_losses(arch, config, state, windows, *, device, autocast_dtype, batch_size: int = 64) -> Tensor:
    device = torch.device(device)
    model = model_with_weights(arch, config, state).to(device)
    model.eval()
    precision = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                 else contextlib.nullcontext())
    out = []
    with precision:
        for s in range(0, windows.shape[0], batch_size):
            w = windows[s : s + batch_size].to(device)
            logits = model(w[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), w[:, 1:], reduction="none")
            out.append(loss.mean(dim=1).cpu())
    return torch.cat(out)


def _mean_se(x: Tensor) -> tuple[float, float]:
    """Mean and standard error of a 1-D sample (float64)."""
    x = x.double()
    n = x.numel()
    return float(x.mean()), (float(x.var(unbiased=True)) / n if n > 1 else 0.0) ** 0.5


def specialisation(g: Gains, centre: Gains | None = None) -> tuple[float, float]:
    """The score (own-shard minus other-data gain, each relative to ``centre``'s on the same windows) and
    its z (score over its standard error; ±inf when the windows agree exactly). Without per-window gains,
    the z is taken as +inf for a positive score (nothing to measure the noise by)."""
    if g.own is None or g.other is None or (centre is not None and (centre.own is None or centre.other is None)):
        score = g.own_gain - g.other_gain
        if centre is not None:
            score -= centre.own_gain - centre.other_gain
        return score, (math.inf if score > 0 else -math.inf)
    d_own = g.own - centre.own if centre is not None else g.own
    d_other = g.other - centre.other if centre is not None else g.other
    (m_own, se_own), (m_other, se_other) = _mean_se(d_own), _mean_se(d_other)
    score = m_own - m_other
    se = math.hypot(se_own, se_other)
    if not math.isfinite(score):
        return score, math.nan
    if se == 0:
        return score, (math.inf if score > 0 else -math.inf)
    return score, score / se


def _mean_z(x: Tensor) -> tuple[float, float]:
    """Mean of a 1-D sample and its z (mean over standard error; ±inf when the values agree exactly)."""
    mean, se = _mean_se(x)
    if not math.isfinite(mean):
        return mean, math.nan
    if se == 0:
        return mean, (math.inf if mean > 0 else -math.inf)
    return mean, mean / se


def round_z(gains: list[Gains | None], centre: list[Gains | None]) -> float:
    """The median z of a round's scored updates against their centre (-inf when none has a centre): an
    honest majority's, which a minority cannot move."""
    zs = [specialisation(g, c)[1] for g, c in zip(gains, centre, strict=True)
          if g is not None and c is not None and math.isfinite(g.own_gain) and math.isfinite(g.other_gain)]
    zs = [-math.inf if math.isnan(z) else z for z in zs]
    return statistics.median(zs) if zs else -math.inf


def judge(
    gains: list[Gains | None],
    *,
    centre: list[Gains | None] | None = None,
    public: list[Gains | None] | None = None,
    min_z: float = DEFAULT_MIN_Z,
    tolerance: float = DEFAULT_TOLERANCE,
    min_round_z: float = DEFAULT_MIN_ROUND_Z,
    min_share: float = DEFAULT_MIN_SHARE,
    first_round: bool = False,
) -> list[Score]:
    """One verdict per update of a round (None: the update was not scored, e.g. screened out first).

    ``centre[i]``: the round centre's gains on update i's windows. With a centre, an update passes when its
    losses after are finite and its specialisation score is positive with ``z ≥ min_z`` (see
    :func:`specialisation`): it learns its own windows better than other data, beyond what the round's
    consensus step does on the same windows, provided the round's median z is at least ``min_round_z``; and
    its score is at least ``min_share`` of the round's median score (when the round's median z is at least
    ``min_z``: its median update specialised), which a copy of the consensus never is.

    Without one (None), or in a round whose median z is lower, the fallback rule of the module docstring:
    its own-window gain is positive with ``z ≥ min_z``, ``own_gain ≥ (1 − tolerance) · other_gain``, and,
    where ``public[i]`` gives the gains on update i's windows of its projection on the last public outer
    step (None: the run has no public step yet), it beats them on its own windows with ``z ≥ min_z``; with a centre, the share
    of the median score holds there too. ``first_round``: the run has no public step yet, so there is nothing
    public to copy, and the whole round is judged by the fallback rule (a first round from a random start
    specialises faintly: honest z's there reach down to about 1.3).
    """
    if not math.isfinite(min_z) or min_z < 0:
        raise ValueError("min_z must be a finite number >= 0")
    if not 0.0 <= tolerance < 1.0:
        raise ValueError("tolerance must be in [0, 1)")
    if not 0.0 <= min_share < 1.0:
        raise ValueError("min_share must be in [0, 1)")
    centre = centre if centre is not None else [None] * len(gains)
    public = public if public is not None else [None] * len(gains)
    if len(centre) != len(gains) or len(public) != len(gains):
        raise ValueError("centre and public need one entry per update")
    median_z = round_z(gains, centre)
    conclusive = median_z >= min_round_z and not first_round
    scores = [specialisation(g, c)[0] for g, c in zip(gains, centre, strict=True)
              if g is not None and c is not None and math.isfinite(g.own_gain) and math.isfinite(g.other_gain)]
    scores = [x for x in scores if math.isfinite(x)]
    median_score = statistics.median(scores) if scores else math.nan
    # The least score that counts as work of one's own; None where the round's median score is no scale
    # (the median update has not specialised beyond chance, z < min_z: nobody has yet).
    floor = min_share * median_score if median_score > 0 and median_z >= min_z else None
    out = []
    for g, c, p in zip(gains, centre, public, strict=True):
        if g is None:
            out.append(Score(False, "not scored", None, None, None))
            continue
        own, other = g.own_gain, g.other_gain
        fields = {"own_gain": own, "other_gain": other, "own_before": g.own_before, "own_after": g.own_after,
                  "other_before": g.other_before, "other_after": g.other_after,
                  "centre_own_gain": c.own_gain if c is not None else None,
                  "centre_other_gain": c.other_gain if c is not None else None,
                  "public_own_gain": p.own_gain if p is not None else None}
        if not (math.isfinite(own) and math.isfinite(other)):
            out.append(Score(False, "loss after the update is not finite", score=None, **fields))
            continue
        score, z = specialisation(g, c)
        small = (c is not None and floor is not None and not score >= floor)
        if c is not None and conclusive:
            against = " beyond the round's centre"
            if not (score > 0 and z >= min_z):
                out.append(Score(False, f"does not learn its own windows better than other data{against} "
                                        f"(score {score:.4g}, z {z:.2f} < {min_z:g})", score=score, z=z, **fields))
            elif small:
                out.append(Score(False, _too_small(score, median_score, min_share), score=score, z=z, **fields))
            else:
                out.append(Score(True, f"learns its own windows better than other data{against} (z {z:.2f})",
                                 score=score, z=z, **fields))
            continue
        why = ("too few updates for a centre" if c is None
               else "the run's first round: nothing public to copy yet" if first_round
               else f"the round's median z {median_z:.2f} is under {min_round_z:g}: too early to tell work apart")
        verdict = _fallback(g, p, min_z=min_z, tolerance=tolerance, min_share=min_share, why=why, score=score, z=z,
                            fields=fields)
        if verdict.passed and small:
            verdict = Score(False, f"{_too_small(score, median_score, min_share)} ({why})", score=score, z=z,
                            **fields)
        out.append(verdict)
    return out


def _too_small(score: float, median_score: float, min_share: float) -> str:
    return (f"learns its own windows too little beyond the round's centre to be its own work (score {score:.4g} "
            f"< {min_share:g} x the round's median score {median_score:.4g})")


def _fallback(g: Gains, p: Gains | None, *, min_z: float, tolerance: float, min_share: float, why: str,
              score: float, z: float, fields: dict) -> Score:
    """The verdict of the fallback rule (see the module docstring)."""
    own, other = g.own_gain, g.other_gain

    def fail(reason: str, **extra) -> Score:
        return Score(False, f"{reason} ({why})", score=score, z=z, **{**fields, **extra})

    if own <= 0:
        return fail(f"does not lower the loss on its own windows (gain {own:.4g})")
    if own < (1 - tolerance) * other:
        return fail(f"learns other data ({other:.4g}) better than its own windows ({own:.4g})")
    if g.own is not None:
        _mean, own_z = _mean_z(g.own)
        if not own_z >= min_z:
            return fail(f"lowers the loss on its own windows by too little to tell from chance (z {own_z:.2f} < "
                        f"{min_z:g})")
    if p is not None:
        if g.own is not None and p.own is not None:
            beyond, beyond_z = _mean_z(g.own - p.own)
        else:
            beyond = own - p.own_gain
            beyond_z = math.inf if beyond > 0 else -math.inf
        if not (beyond > 0 and beyond_z >= min_z):
            return fail(f"does not learn its own windows better than its share of the last public outer step "
                        f"does (gain {own:.4g} against {p.own_gain:.4g}, z {beyond_z:.2f} < {min_z:g})")
        if beyond < min_share * max(p.own_gain, 0.0):
            # Lucky noise on top of the public share can beat it by a hair on every window (a large z);
            # trained windows are learnt by a sizeable margin.
            return fail(f"learns its own windows too little beyond its share of the last public outer step "
                        f"(gain {own:.4g} against {p.own_gain:.4g}: under {min_share:g} x more)")
        return Score(True, f"learns its own windows beyond its share of the last public outer step ({why})",
                     score=score, z=z, **fields)
    return Score(True, f"lowers the loss on its own windows ({why})", score=score, z=z, **fields)
