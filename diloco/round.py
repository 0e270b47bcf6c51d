"""One DiLoCo outer round as plain functions: screen -> aggregate -> outer step -> evaluation gate.

The server (``training.services.aggregation``), the benchmarks and the tests all call :func:`outer_round`;
nothing here knows about Django, storage or time limits. The caller passes the round's base weights,
its decoded updates with ids, the previous round's accepted norms, the aggregator, the outer optimizer
and its state, and a callable that evaluates weights on held-out data; it gets back a verdict for every
update, the new weights and optimizer, the held-out losses and whether the step was accepted.

    base θ, updates Δ_1..Δ_k
      -> screen: finite, norm within a ratio of the round's (and the last round's) median,
                 direction agreeing with the others' coordinate median       (``diloco.aggregate``)
      -> aggregate the accepted Δ (mean, trimmed mean, median, norm-clipped mean)
      -> outer step (Nesterov SGD)                                          (``diloco.outer``)
      -> evaluation gate: held-out loss after the step may rise by at most ``eval_tolerance``

A :class:`Verdict` has room for per-update contribution scores (``score``, filled by a later stage such
as ``diloco.scoring``); :meth:`Verdict.blamed` says whether a rejection should cost the worker
reliability.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

from torch import Tensor

from diloco.aggregate import ACCEPTED, METHODS, NON_FINITE, aggregate, screen_updates
from diloco.outer import OuterOptimizer

UNREADABLE = "unreadable"
STEP_REJECTED = "step_rejected"
# A rejection for one of these codes is the update's own fault whatever the rest of the round did.
# A replay or a failed contribution score (``diloco.contributions``) judges the update by itself too.
SELF_EVIDENT_CODES = frozenset({NON_FINITE, "replay", "score"})


@dataclass(frozen=True)
class AggregatorSpec:
    method: str = "trimmed_mean"
    trim_fraction: float = 0.25
    clip_norm: float | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown aggregator {self.method!r} (known: {', '.join(METHODS)})")


@dataclass(frozen=True)
class ScreenSpec:
    """Screening limits (see ``diloco.aggregate.screen_updates`` for why these values)."""

    max_norm_ratio: float = 5.0
    min_cosine_ratio: float = 0.4
    opposed_cosine: float = -0.5


@dataclass(frozen=True)
class OuterSpec:
    lr: float = 0.7
    momentum: float = 0.9
    nesterov: bool = True
    # "fp16"/"fp32": the step is rounded and kept as the exact published delta (``diloco.outer``), which an
    # agent applies to its checkpoint instead of downloading the new one (``diloco.sparse``).
    publish: str | None = None


@dataclass
class Update:
    """One worker's decoded pseudo-gradient. ``tensors`` is None when it could not be read (``error``
    says why): the update is then rejected without blame, since the server validated it at upload."""

    id: Hashable
    tensors: dict[str, Tensor] | None
    error: str = ""


@dataclass
class Verdict:
    id: Hashable
    accepted: bool  # passed screening (and so entered the aggregate)
    code: str  # "accepted", "non_finite", "norm_high", "norm_low", "direction", "unreadable"
    reason: str
    norm: float | None = None
    cosine: float | None = None
    score: dict | None = None  # contribution scores, filled by a later stage
    extra: dict = field(default_factory=dict)

    def blamed(self, *, step_accepted: bool) -> bool:
        """Whether this update's rejection should count against its worker. A non-finite update is at
        fault whatever the others did. A norm or direction verdict judges it against the round, so it is
        only trusted when the evaluation confirmed the round (the step was accepted): when the step
        itself is rejected the judging majority may have been the poisoned one, and an honest update
        turned away by it must not pay for that."""
        if self.accepted or self.code == UNREADABLE:
            return False
        return self.code in SELF_EVIDENT_CODES or step_accepted

    def credited(self, *, step_accepted: bool) -> bool:
        return self.accepted and step_accepted


@dataclass
class RoundResult:
    verdicts: list[Verdict]
    accepted: bool  # the outer step was taken
    reason: str  # why not, when not
    eval_before: float | None
    eval_after: float | None
    new_state: dict[str, Tensor] | None = None
    optimizer: OuterOptimizer | None = None
    pseudo_gradient: dict[str, Tensor] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def blamed(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.blamed(step_accepted=self.accepted)]

    def credited(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.credited(step_accepted=self.accepted)]


# The norms that bound a round's (``reference_norms``): the accepted updates of this many latest accepted
# rounds, once they number at least MIN_REFERENCE (two: a two-worker run's first round is reference enough,
# a round that accepted a single update is not).
REFERENCE_ROUNDS = 5
MIN_REFERENCE = 2


def reference_norms(rounds: Sequence[Sequence[float]], *, last: int = REFERENCE_ROUNDS,
                    minimum: int = MIN_REFERENCE) -> list[float]:
    """The norms whose median bounds the next round's (``screen``'s ``previous_norms``): the accepted
    updates' norms of the ``last`` latest rounds of ``rounds`` (oldest first; each the norms of one accepted
    round's accepted updates), pooled; none while the pool holds fewer than ``minimum``. Pooling several
    rounds keeps one odd round (say one that accepted a single tiny update) from setting the bar for every
    round after it."""
    pool = [n for norms in list(rounds)[-last:] if last > 0 for n in norms
            if n is not None and math.isfinite(n) and n > 0]
    return pool if len(pool) >= minimum else []


def screen(
    updates: Sequence[Update], *, spec: ScreenSpec = ScreenSpec(), previous_norms: Sequence[float] = ()
) -> list[Verdict]:
    """A verdict per update, in order (see ``diloco.aggregate.screen_updates``). ``previous_norms``: the
    norms of earlier rounds' accepted updates (``reference_norms``); their median bounds this round's norms
    too, so a few attackers in a small round cannot drag the round's own median. It bounds a minority only:
    where it would turn away more than half of the round, the round's own median judges alone."""
    history = [n for n in previous_norms if n is not None and math.isfinite(n) and n > 0]
    reference = statistics.median(history) if history else None
    readable = [u for u in updates if u.tensors is not None]
    screens = iter(screen_updates([u.tensors for u in readable], max_norm_ratio=spec.max_norm_ratio,
                                  min_cosine_ratio=spec.min_cosine_ratio, opposed_cosine=spec.opposed_cosine,
                                  reference_norm=reference) if readable else [])
    verdicts = []
    for u in updates:
        if u.tensors is None:
            verdicts.append(Verdict(u.id, False, UNREADABLE, f"update unreadable: {u.error or 'no data'}"))
            continue
        s = next(screens)
        verdicts.append(Verdict(u.id, s.accepted, s.code, s.reason, s.norm if s.norm >= 0 else None,
                                s.cosine))
    return verdicts


def gate(eval_before: float | None, eval_after: float | None, *, tolerance: float) -> str:
    """Why the step is rejected ("" when it passes): the held-out loss after it is not finite, or rose
    by more than ``tolerance`` (a fraction) over the loss before."""
    if eval_after is None or not math.isfinite(eval_after):
        return "held-out loss after the step is not finite"
    if eval_before is not None and math.isfinite(eval_before) and eval_after > eval_before * (1 + tolerance):
        return (f"held-out loss rose from {eval_before:.4f} to {eval_after:.4f} "
                f"(more than {tolerance:.0%}); step rejected")
    return ""


def outer_round(
    *,
    base_state: dict[str, Tensor],
    updates: Sequence[Update],
    evaluate: Callable[[dict[str, Tensor]], float],
    aggregator: AggregatorSpec = AggregatorSpec(),
    outer: OuterSpec = OuterSpec(),
    outer_state: dict[str, Tensor] | None = None,
    previous_norms: Sequence[float] = (),
    screening: ScreenSpec = ScreenSpec(),
    eval_before: float | None = None,
    eval_tolerance: float = 0.10,
    on_phase: Callable[[str], None] | None = None,
    on_step: Callable[[dict[str, Tensor], OuterOptimizer], None] | None = None,
    contributions: Callable[[Sequence[Update], list[Verdict]], object] | None = None,
) -> RoundResult:
    """Screen, aggregate, step and gate one round.

    ``evaluate(state) -> loss`` is called on the base weights (unless ``eval_before`` is given, e.g. the
    last round's loss after its step) and on the new weights. ``outer_state`` is the optimizer state
    exported by the previous round (``OuterOptimizer.state_tensors``), None for the first. ``on_phase``
    is called at each phase boundary with the phase just finished (a server renews its lease there, and
    may raise to abandon the round); ``on_step(new_state, optimizer)`` right after the outer step and
    before the evaluation (a server starts writing the step's files there, in parallel). The base
    weights are not modified.
    """
    phase = on_phase or (lambda _name: None)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    verdicts = screen(updates, spec=screening, previous_norms=previous_norms)
    timings["screen_s"] = time.perf_counter() - t
    if contributions is not None:
        # Replay and score checks (``diloco.contributions.check_contributions``) turn away screened-in
        # updates that are not new work on their own shard, before they can steer the aggregate.
        t = time.perf_counter()
        contributions(updates, verdicts)
        timings["contributions_s"] = time.perf_counter() - t
    phase("screen")
    t = time.perf_counter()
    if eval_before is None:
        eval_before = evaluate(base_state)
    timings["eval_before_s"] = time.perf_counter() - t
    good = [u.tensors for u, v in zip(updates, verdicts, strict=True) if v.accepted]
    if not good:
        return RoundResult(verdicts, False, "no update passed screening", eval_before, None, timings=timings)
    t = time.perf_counter()
    pseudo_gradient = aggregate(good, aggregator.method, trim_fraction=aggregator.trim_fraction,
                                clip_norm=aggregator.clip_norm)
    timings["aggregate_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if outer_state:
        opt = OuterOptimizer.from_state(base_state, outer_state, lr=outer.lr, momentum=outer.momentum,
                                        nesterov=outer.nesterov, publish=outer.publish)
    else:
        opt = OuterOptimizer(base_state, lr=outer.lr, momentum=outer.momentum, nesterov=outer.nesterov,
                             publish=outer.publish)
    new_state = opt.step(pseudo_gradient)
    timings["outer_step_s"] = time.perf_counter() - t
    phase("step")
    if on_step is not None:
        on_step(new_state, opt)
    t = time.perf_counter()
    eval_after = evaluate(new_state)
    timings["eval_after_s"] = time.perf_counter() - t
    phase("evaluate")
    rejection = gate(eval_before, eval_after, tolerance=eval_tolerance)
    finite_after = eval_after if eval_after is not None and math.isfinite(eval_after) else None
    if rejection:
        return RoundResult(verdicts, False, rejection, eval_before, finite_after, pseudo_gradient=pseudo_gradient,
                           timings=timings)
    return RoundResult(verdicts, True, "", eval_before, eval_after, new_state=new_state, optimizer=opt,
                       pseudo_gradient=pseudo_gradient, timings=timings)


__all__ = [
    "ACCEPTED", "NON_FINITE", "STEP_REJECTED", "UNREADABLE", "AggregatorSpec", "OuterSpec", "RoundResult",
    "ScreenSpec", "Update", "Verdict", "gate", "outer_round", "reference_norms", "screen",
]
