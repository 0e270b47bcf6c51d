"""Scoring one contribution: does a worker's update teach the model its own shard?

Gauntlet-style (Templar): apply the pseudo-gradient Δ to the round's base weights (θ − scale·Δ; scale 1 gives
back the worker's own trained weights) and measure the loss on a few fixed windows of the worker's own shard
and of data it was not given (another shard, or held-out text), before and after. An honest worker that
trained H steps on its shard lowers the loss there; a free-rider that sends noise does not, and one that
sends somebody else's work (another shard, a public outer step) learns the other data as well as its own.

    own_gain   = loss_own(θ)   − loss_own(θ − scale·Δ)
    other_gain = loss_other(θ) − loss_other(θ − scale·Δ)
    score      = own_gain − other_gain

A single score is noisy early in training (every shard teaches the same byte statistics), so the verdict
(:func:`judge`) is made over the round: an update passes when it lowers its own-shard loss, by at least
``min_share`` of the round's median own-shard gain (a minority cannot move a median), and does not learn
the other data clearly better than its own (``own_gain ≥ (1 − tolerance) · other_gain``).

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

# Late in a run the gains are small and a few windows measure them roughly, so the comparison with other
# data only turns away an update that learns other data four times better than its own shard.
DEFAULT_TOLERANCE = 0.75
DEFAULT_MIN_SHARE = 0.2


@dataclasses.dataclass(frozen=True)
class Gains:
    """Losses before and after applying one update, on its own shard and on other data."""

    own_before: float
    own_after: float
    other_before: float
    other_after: float

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

    def as_json(self) -> dict:
        """JSON-safe (non-finite numbers become None), rounded to 6 significant digits."""

        def clean(x):
            return float(f"{x:.6g}") if x is not None and math.isfinite(x) else None

        return {"passed": self.passed, "reason": self.reason, "own_gain": clean(self.own_gain),
                "other_gain": clean(self.other_gain), "score": clean(self.score),
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


def windows_loss(
    arch: str,
    config: dict,
    state: dict[str, Tensor],
    windows: Tensor,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """Mean next-token cross-entropy of the model with weights ``state`` over ``windows``, in batches of
    ``batch_size`` windows (under autocast when ``autocast_dtype`` is given; the loss is reduced in fp32)."""
    per = _per_window_losses(arch, config, state, windows, device=device, autocast_dtype=autocast_dtype,
                             batch_size=batch_size)
    return float(per.mean())


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
    own_before: float | None = None,
    other_before: float | None = None,
    scale: float = 1.0,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> Gains:
    """Losses on the ``own`` and ``other`` windows before (pass them in when already known: they depend on
    the base weights only) and after applying ``update`` at ``scale`` to ``base``. The two after-losses come
    from one batched pass over both window sets."""
    kw = {"device": device, "autocast_dtype": autocast_dtype}
    if own_before is None:
        own_before = windows_loss(arch, config, base, own, **kw)
    if other_before is None:
        other_before = windows_loss(arch, config, base, other, **kw)
    after_state = applied(base, update, scale)
    if own.shape[1] == other.shape[1]:
        both = torch.cat([own, other])
        n_own = own.shape[0]
        per = _per_window_losses(arch, config, after_state, both, **kw)
        own_after, other_after = float(per[:n_own].mean()), float(per[n_own:].mean())
    else:
        own_after = windows_loss(arch, config, after_state, own, **kw)
        other_after = windows_loss(arch, config, after_state, other, **kw)
    return Gains(own_before, own_after, other_before, other_after)


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


def judge(
    gains: list[Gains | None],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    min_share: float = DEFAULT_MIN_SHARE,
) -> list[Score]:
    """One verdict per update of a round (None: the update was not scored, e.g. screened out first).

    An update passes when (1) its own-shard gain is finite and positive, (2) at least ``min_share`` of the
    median own-shard gain of the round's scored updates (when that median is positive), and (3) it does
    not learn the other data clearly better than its own: ``own_gain ≥ (1 − tolerance) · other_gain``.
    """
    if not 0.0 <= tolerance < 1.0:
        raise ValueError("tolerance must be in [0, 1)")
    if not 0.0 <= min_share <= 1.0:
        raise ValueError("min_share must be in [0, 1]")
    finite = [g.own_gain for g in gains if g is not None and math.isfinite(g.own_gain)]
    median = statistics.median(finite) if finite else float("nan")
    out = []
    for g in gains:
        if g is None:
            out.append(Score(False, "not scored", None, None, None))
            continue
        own, other = g.own_gain, g.other_gain
        fields = {"own_gain": own, "other_gain": other, "score": own - other, "own_before": g.own_before,
                  "own_after": g.own_after, "other_before": g.other_before, "other_after": g.other_after}
        if not (math.isfinite(own) and math.isfinite(other)):
            out.append(Score(False, "loss after the update is not finite", **fields))
        elif own <= 0:
            out.append(Score(False, f"does not lower the loss on its own shard (gain {own:.4g})", **fields))
        elif median > 0 and own < min_share * median:
            out.append(Score(False, f"own-shard gain {own:.4g} is under {min_share:g}x the round's median "
                                    f"{median:.4g}", **fields))
        elif own < (1 - tolerance) * other:
            out.append(Score(False, f"learns other data ({other:.4g}) better than its own shard ({own:.4g})",
                             **fields))
        else:
            out.append(Score(True, "learns its own shard", **fields))
    return out
