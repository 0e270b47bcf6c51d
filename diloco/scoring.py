"""Scoring one contribution: does a worker's update teach the model its own shard?

Gauntlet-style (Templar): apply the pseudo-gradient Δ to the round's base weights (θ − scale·Δ; scale 1 gives
back the worker's own trained weights) and measure the loss on a few fixed windows of the worker's own shard
and of data it was not given (other shards), before and after. An honest worker that trained H steps on its
shard learns that shard more than the others; a free-rider that sends noise, somebody else's work or the
round's consensus does not.

Per window w the gain is ``loss_θ(w) − loss_{θ−scale·Δ}(w)``. Two things make a raw own-versus-other gain
too noisy to judge one update by: shards differ in how much *any* step teaches them (one shard's text is
easier), and every update teaches every shard the same common statistics. So each window's gain is taken
relative to the gain of the round's **centre** on the same window (the coordinate median of the round's
scored updates, which a minority cannot move), and the score is a difference of differences:

    d(w)  = gain_Δ(w) − gain_centre(w)                  (paired on the same window)
    score = mean_{w ∈ own shard} d(w) − mean_{w ∈ other shards} d(w)
    z     = score / its standard error over the windows

An honest update beats the centre on its own shard (the centre holds only a share of that shard's work)
and trails it elsewhere (the centre is the better generic step): score > 0. An update that copies the
consensus ("a little is enough"), another shard's work, a public step or noise has no own-shard advantage:
score ≈ 0 within its noise. The verdict (:func:`judge`) asks ``z ≥ min_z``, in a round where the test can
tell work apart: the median z of the round's scored updates (an honest majority's, which a minority cannot
move) is at least ``min_round_z``. After a few inner steps, or from a random start, honest updates have not
specialised yet and their z's sit near zero too; such a round is judged by the rule without a centre
below, rather than refuse honest work it cannot see.

Without a centre (fewer than 3 scored updates: a centre of one or two is the updates themselves) nothing
measures how much any step teaches each window, and the raw gains are too noisy for a z: the update must
then lower its own shard's loss and not learn the other data more than four times better than its own
(``own_gain ≥ (1 − tolerance) · other_gain``).

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

# The score must stand this many standard errors above zero.
DEFAULT_MIN_Z = 1.0
# The median z a round needs before a low z is held against an update.
DEFAULT_MIN_ROUND_Z = 2.0
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

    def as_json(self) -> dict:
        """JSON-safe (non-finite numbers become None), rounded to 6 significant digits."""

        def clean(x):
            return float(f"{x:.6g}") if x is not None and math.isfinite(x) else None

        return {"passed": self.passed, "reason": self.reason, "own_gain": clean(self.own_gain),
                "other_gain": clean(self.other_gain), "score": clean(self.score), "z": clean(self.z),
                "centre_own_gain": clean(self.centre_own_gain), "centre_other_gain": clean(self.centre_other_gain),
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


def judge(
    gains: list[Gains | None],
    *,
    centre: list[Gains | None] | None = None,
    min_z: float = DEFAULT_MIN_Z,
    tolerance: float = DEFAULT_TOLERANCE,
    min_round_z: float = DEFAULT_MIN_ROUND_Z,
) -> list[Score]:
    """One verdict per update of a round (None: the update was not scored, e.g. screened out first).

    ``centre[i]``: the round centre's gains on update i's windows. With a centre, an update passes when its
    losses after are finite and its specialisation score is positive with ``z ≥ min_z`` (see
    :func:`specialisation`): it learns its own shard better than other data, beyond what the round's
    consensus step does on the same windows, provided the round's median z is at least ``min_round_z``.
    Without one (None), or in a round whose median z is lower, when its own-shard gain is positive and
    ``own_gain ≥ (1 − tolerance) · other_gain``.
    """
    if not math.isfinite(min_z) or min_z < 0:
        raise ValueError("min_z must be a finite number >= 0")
    if not 0.0 <= tolerance < 1.0:
        raise ValueError("tolerance must be in [0, 1)")
    centre = centre if centre is not None else [None] * len(gains)
    if len(centre) != len(gains):
        raise ValueError("centre needs one entry per update")
    zs = [specialisation(g, c)[1] for g, c in zip(gains, centre, strict=True)
          if g is not None and c is not None and math.isfinite(g.own_gain) and math.isfinite(g.other_gain)]
    zs = [-math.inf if math.isnan(z) else z for z in zs]
    round_z = statistics.median(zs) if zs else -math.inf
    conclusive = round_z >= min_round_z
    out = []
    for g, c in zip(gains, centre, strict=True):
        if g is None:
            out.append(Score(False, "not scored", None, None, None))
            continue
        own, other = g.own_gain, g.other_gain
        fields = {"own_gain": own, "other_gain": other, "own_before": g.own_before, "own_after": g.own_after,
                  "other_before": g.other_before, "other_after": g.other_after,
                  "centre_own_gain": c.own_gain if c is not None else None,
                  "centre_other_gain": c.other_gain if c is not None else None}
        if not (math.isfinite(own) and math.isfinite(other)):
            out.append(Score(False, "loss after the update is not finite", score=None, **fields))
            continue
        score, z = specialisation(g, c)
        if c is None or not conclusive:
            why = ("too few updates for a centre" if c is None
                   else f"the round's median z {round_z:.2f} is under {min_round_z:g}: too early to tell work apart")
            if own <= 0:
                out.append(Score(False, f"does not lower the loss on its own shard (gain {own:.4g})", score=score,
                                 z=z, **fields))
            elif own < (1 - tolerance) * other:
                out.append(Score(False, f"learns other data ({other:.4g}) better than its own shard ({own:.4g})",
                                 score=score, z=z, **fields))
            else:
                out.append(Score(True, f"lowers the loss on its own shard ({why})", score=score, z=z, **fields))
            continue
        against = " beyond the round's centre"
        if score > 0 and z >= min_z:
            out.append(Score(True, f"learns its own shard better than other data{against} (z {z:.2f})",
                             score=score, z=z, **fields))
        else:
            out.append(Score(False, f"does not learn its own shard better than other data{against} "
                                    f"(score {score:.4g}, z {z:.2f} < {min_z:g})", score=score, z=z, **fields))
    return out
