"""Judging a round's updates as work, between screening and aggregation: replays, then scores.

For every update that passed screening, in order:

1. replay: its sha256 or its sketch's direction repeats an earlier update of the run, an earlier update of
   this round, or a public outer step (``diloco.replay``);
2. score: the losses on its own shard's windows and on another shard's, before and after applying it to
   the round's base weights (``diloco.scoring``), judged over the round.

An update that is a replay or fails its score is turned away from the aggregate (so a free-rider does not
steer the step either), earns nothing and is blamed: both verdicts judge the update by itself (a replay is
a replay whatever the others did, and the score's only round-wide figure is a median a minority cannot
move). Every update with readable finite tensors gets a sketch, so later rounds can recognise it.

The verdict objects are ``diloco.round.Verdict``s (anything with ``id``, ``accepted``, ``code``,
``reason``, ``score`` and ``extra``); they are updated in place.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

from diloco.replay import DEFAULT_DIM, DEFAULT_THRESHOLD, Earlier, replay_check, sketch
from diloco.scoring import DEFAULT_MIN_SHARE, DEFAULT_TOLERANCE, Gains, judge, update_gains, windows_loss

REPLAY = "replay"
SCORE = "score"
CODES = frozenset({REPLAY, SCORE})


@dataclasses.dataclass
class ContributionCheck:
    """What the caller knows about a round to judge its updates.

    ``own[id]`` and ``other[id]`` name the window sets (keys of ``windows``) an update is scored on: its own
    shard's and another shard's (or held-out text). ``sha256[id]`` is the stored update's digest. ``earlier``
    holds the run's earlier updates and public outer steps. ``sketch_seed`` should stay the same for a whole
    run and be unknown to the workers.
    """

    arch: str
    config: dict
    windows: dict[Hashable, Tensor]
    own: dict[Hashable, Hashable]
    other: dict[Hashable, Hashable]
    sketch_seed: int
    sha256: dict[Hashable, str] = dataclasses.field(default_factory=dict)
    earlier: list[Earlier] = dataclasses.field(default_factory=list)
    scale: float = 1.0
    tolerance: float = DEFAULT_TOLERANCE
    min_share: float = DEFAULT_MIN_SHARE
    replay_threshold: float = DEFAULT_THRESHOLD
    sketch_dim: int = DEFAULT_DIM
    score: bool = True  # False: replay checks only
    device: str | torch.device = "cpu"
    autocast_dtype: torch.dtype | None = None


def _finite(tensors: dict[str, Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


def check_contributions(base_state: dict[str, Tensor], updates: Sequence, verdicts: Sequence,
                        check: ContributionCheck) -> dict[Hashable, Tensor]:
    """Run the replay and score checks on the screened-in updates, turning away those that fail (``code``
    ``replay`` or ``score``; ``score`` holds the figures as JSON). Returns the sketch of every update with
    finite tensors, by id (also in ``verdict.extra["sketch"]`` as a tensor)."""
    sketches: dict[Hashable, Tensor] = {}
    earlier = list(check.earlier)
    for u, v in zip(updates, verdicts, strict=True):
        if u.tensors is None or (not v.accepted and v.code == "non_finite") or not _finite(u.tensors):
            continue
        s = sketch(u.tensors, seed=check.sketch_seed, dim=check.sketch_dim)
        sketches[u.id] = s
        v.extra["sketch"] = s
        sha = check.sha256.get(u.id, "")
        if v.accepted:
            found = replay_check(sha256=sha, update_sketch=s, earlier=earlier, threshold=check.replay_threshold)
            v.extra["replay_max_cosine"] = round(found.max_cosine, 6)
            if found.replay:
                v.accepted, v.code, v.reason = False, REPLAY, f"replay: {found.reason}"
                v.score = {"passed": False, "reason": v.reason, "replay_of": found.closest,
                           "max_cosine": round(found.max_cosine, 6)}
        earlier.append(Earlier(f"update {u.id} of this round", s, sha))
    if not check.score:
        return sketches
    scored = [(u, v) for u, v in zip(updates, verdicts, strict=True) if v.accepted]
    if not scored:
        return sketches
    kw = {"device": check.device, "autocast_dtype": check.autocast_dtype}
    before: dict[Hashable, float] = {}

    def loss_before(key: Hashable) -> float:
        if key not in before:
            before[key] = windows_loss(check.arch, check.config, base_state, check.windows[key], **kw)
        return before[key]

    gains: list[Gains] = []
    for u, _v in scored:
        own, other = check.own[u.id], check.other[u.id]
        gains.append(update_gains(arch=check.arch, config=check.config, base=base_state, update=u.tensors,
                                  own=check.windows[own], other=check.windows[other], own_before=loss_before(own),
                                  other_before=loss_before(other), scale=check.scale, **kw))
    for (_u, v), score in zip(scored, judge(gains, tolerance=check.tolerance, min_share=check.min_share),
                              strict=True):
        v.score = score.as_json()
        v.score["replay_max_cosine"] = v.extra.get("replay_max_cosine")
        if not score.passed:
            v.accepted, v.code, v.reason = False, SCORE, f"score: {score.reason}"
    return sketches


def step_sketch(base_state: dict[str, Tensor], new_state: dict[str, Tensor], *, seed: int,
                dim: int = DEFAULT_DIM) -> Tensor | None:
    """The sketch of a public outer step θ_{r−1} − θ_r (None when it is not finite)."""
    step = {k: base_state[k].float() - new_state[k].float() for k in base_state}
    s = sketch(step, seed=seed, dim=dim)
    return s if all(math.isfinite(x) for x in s.tolist()) else None
