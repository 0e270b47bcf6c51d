"""Judging a round's updates as work, between screening and aggregation: replays, then scores.

For every update that passed screening, in order:

1. replay: its sha256 or its sketch's direction repeats an earlier update of the run, an earlier update of
   this round, or a public outer step (``diloco.replay``);
2. score: the per-window losses on windows its task trained on (``trained_windows``) and on other shards',
   before and after applying it to the round's base weights, each window's gain taken relative to the gain
   of the round's centre (the coordinate median of the updates being scored) on the same window; in a round
   too small or too early for that, against its own projection on the last public outer step, the part of it
   anyone could have made from the public checkpoints (``diloco.scoring``).

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
from collections.abc import Callable, Hashable, Sequence

import torch
from torch import Tensor

from diloco.aggregate import aggregate
from diloco.replay import DEFAULT_DIM, DEFAULT_THRESHOLD, Earlier, replay_check, sketch
from diloco.scoring import (
    DEFAULT_MIN_ROUND_Z,
    DEFAULT_MIN_SHARE,
    DEFAULT_MIN_Z,
    DEFAULT_TOLERANCE,
    MIN_CENTRE,
    Gains,
    applied,
    judge,
    round_z,
    score_windows,
    trained_windows,
    update_gains,
    window_losses,
)

REPLAY = "replay"
SCORE = "score"
CODES = frozenset({REPLAY, SCORE})


@dataclasses.dataclass
class ContributionCheck:
    """What the caller knows about a round to judge its updates.

    ``own[id]`` names the window set (a key of ``windows``) of an update's own data (windows its task trained
    on, see :func:`add_trained_windows`, or of its shard), ``other[id]`` the window set, or a list of them, of
    the shards it was not given: the score compares the two. ``sha256[id]`` is the stored update's digest.
    ``earlier`` holds the run's earlier updates and public outer steps. ``sketch_seed`` should stay the same
    for a whole run and be unknown to the workers. ``public_step``: the last public outer step θ_{r−1} − θ_r
    (None in a run's first round, which the fallback rule of ``diloco.scoring`` then judges), or a callable
    giving it (called once per round, when there are updates to score).
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
    min_z: float = DEFAULT_MIN_Z
    tolerance: float = DEFAULT_TOLERANCE  # without a centre (see ``diloco.scoring.judge``)
    min_round_z: float = DEFAULT_MIN_ROUND_Z
    min_share: float = DEFAULT_MIN_SHARE
    centre: bool = True  # judge each window's gain against the round centre's (with MIN_CENTRE updates or more)
    replay_threshold: float = DEFAULT_THRESHOLD
    sketch_dim: int = DEFAULT_DIM
    score: bool = True  # False: replay checks only
    public_step: dict[str, Tensor] | Callable[[], dict[str, Tensor] | None] | None = None
    device: str | torch.device = "cpu"
    autocast_dtype: torch.dtype | None = None


OTHER = "other"
# Other-data windows are drawn from up to this many other shards (the next ones round the ring of shards), so
# the comparison averages over several shards' text instead of resting on how easy one shard happens to be.
OTHER_SHARDS = 7


def shard_windows(tokens: dict[int, Tensor], *, count: int, seq_len: int, seed: int,
                  other_shards: int = OTHER_SHARDS, own: bool = True) -> dict[Hashable, Tensor]:
    """The round's window sets: for every shard ``s`` of ``tokens`` (shard index -> token ids) with more
    than ``seq_len`` tokens, ``count`` own windows under key ``s`` (unless ``own`` is False: the updates are
    scored on the windows they trained on, :func:`add_trained_windows`) and ``ceil(count / other_shards)``
    windows under ``("other", s)`` for the updates of other shards. ``seed`` is the round's secret."""
    n_other = max(1, math.ceil(count / max(1, other_shards)))
    windows: dict[Hashable, Tensor] = {}
    for s, t in sorted(tokens.items()):
        if t.numel() > seq_len:
            if own:
                windows[s] = score_windows(t, count=count, seq_len=seq_len, seed=seed + 2 * s)
            windows[(OTHER, s)] = score_windows(t, count=n_other, seq_len=seq_len, seed=seed + 2 * s + 1)
    return windows


TRAINED = "trained"


def add_trained_windows(windows: dict[Hashable, Tensor], tasks: dict[Hashable, tuple],
                        tokens: dict[int, Tensor], *, steps: int, batch_size: int, seq_len: int, count: int,
                        seed: int) -> dict[Hashable, Hashable]:
    """Add to ``windows``, for every task ``id -> (shard, task seed)`` whose shard has more than ``seq_len``
    tokens, ``count`` of the windows it trained on (``diloco.scoring.trained_windows``, picked by the round's
    secret ``seed``) under ``("trained", shard, task seed, steps)`` (a replica of a task shares its windows).

    ``id -> (shard, task seed, seed steps)`` says a task drew only its first ``seed steps`` batches from its
    seed (1..``steps``): an overlapping agent trains the rest ahead, on the previous task's batches, before
    the task arrives. Returns the own-window key of every such task, by id."""
    keys: dict[Hashable, Hashable] = {}
    for task_id, spec in tasks.items():
        shard, task_seed = spec[0], spec[1]
        task_steps = min(max(int(spec[2]), 1), steps) if len(spec) > 2 and spec[2] is not None else steps
        t = tokens.get(shard)
        if t is None or t.numel() <= seq_len:
            continue
        key = (TRAINED, shard, int(task_seed), task_steps)
        if key not in windows:
            pick = (int(seed) * 1_000_003 + int(task_seed)) % (1 << 63)
            windows[key] = trained_windows(t, steps=task_steps, batch_size=batch_size, seq_len=seq_len,
                                           seed=int(task_seed), count=count, pick_seed=pick)
        keys[task_id] = key
    return keys


def other_keys(shard: int, count: int, windows: dict[Hashable, Tensor], *,
               other_shards: int = OTHER_SHARDS) -> list[Hashable]:
    """The other-data window keys of an update of ``shard`` (of ``count`` shards): the next
    ``other_shards`` shards round the ring that have windows."""
    keys = [(OTHER, (shard + j) % count) for j in range(1, count)]
    return [k for k in keys if k in windows][:other_shards]


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
    before: dict[Hashable, Tensor] = {}

    def losses_before(key: Hashable) -> Tensor:
        if key not in before:
            before[key] = window_losses(check.arch, check.config, base_state, check.windows[key], **kw)
        return before[key]

    def others(update_id: Hashable) -> list[Hashable]:
        keys = check.other[update_id]
        return list(keys) if isinstance(keys, list | tuple) else [keys]

    def windows_of(keys: list[Hashable]) -> Tensor:
        return torch.cat([check.windows[key] for key in keys])

    def before_of(keys: list[Hashable]) -> Tensor:
        return torch.cat([losses_before(key) for key in keys])

    gains: list[Gains] = []
    for u, _v in scored:
        own, other = check.own[u.id], others(u.id)
        gains.append(update_gains(arch=check.arch, config=check.config, base=base_state, update=u.tensors,
                                  own=check.windows[own], other=windows_of(other), own_before=losses_before(own),
                                  other_before=before_of(other), scale=check.scale, **kw))
    centre_gains: list[Gains | None] = [None] * len(scored)
    if check.centre and len(scored) >= MIN_CENTRE:
        # The round's consensus step, measured on every window set once: per window, how much any step
        # teaches that text. A minority cannot move a coordinate median.
        centre = aggregate([u.tensors for u, _v in scored], "median")
        keys = sorted({check.own[u.id] for u, _v in scored} | {k for u, _v in scored for k in others(u.id)},
                      key=repr)
        after = window_losses(check.arch, check.config, applied(base_state, centre, check.scale),
                              windows_of(keys), **kw)
        per_key, at = {}, 0
        for key in keys:
            n = check.windows[key].shape[0]
            per_key[key] = losses_before(key) - after[at : at + n]
            at += n
        centre_gains = []
        for u, _v in scored:
            own, other = per_key[check.own[u.id]], torch.cat([per_key[k] for k in others(u.id)])
            centre_gains.append(Gains(0.0, -float(own.mean()), 0.0, -float(other.mean()), own=own, other=other))
    step = check.public_step() if callable(check.public_step) else check.public_step
    first_round = step is None
    public_gains: list[Gains | None] = [None] * len(scored)
    if not first_round and round_z(gains, centre_gains) < check.min_round_z:
        public_gains = _public_gains(base_state, step, scored, check, losses_before, others)
    verdicts_of = judge(gains, centre=centre_gains, public=public_gains, min_z=check.min_z,
                        tolerance=check.tolerance, min_round_z=check.min_round_z, min_share=check.min_share,
                        first_round=first_round)
    for (_u, v), score in zip(scored, verdicts_of, strict=True):
        v.score = score.as_json()
        v.score["replay_max_cosine"] = v.extra.get("replay_max_cosine")
        if not score.passed:
            v.accepted, v.code, v.reason = False, SCORE, f"score: {score.reason}"
    return sketches


def _public_gains(base_state: dict[str, Tensor], step: dict[str, Tensor], scored: list, check: ContributionCheck,
                  losses_before, others) -> list[Gains | None]:
    """For each scored update Δ, the per-window gains on its own windows of its share of the last public outer
    step P, applied to the round's base weights: the projection ``(⟨Δ, P⟩ / |P|²) · P``, the part of Δ that
    anyone could have made from the public checkpoints at Δ's own scale, on its own windows and on its other
    windows (all None when P is zero or not finite)."""
    p_sq = sum(float(v.double().pow(2).sum()) for v in step.values())
    if not (math.isfinite(p_sq) and p_sq > 0):
        return [None] * len(scored)
    out: list[Gains | None] = []
    for u, _v in scored:
        coef = sum(float((u.tensors[k].double() * step[k].double()).sum()) for k in step) / p_sq
        keys = [check.own[u.id], *others(u.id)]
        after = window_losses(check.arch, check.config, applied(base_state, step, check.scale * coef),
                              torch.cat([check.windows[key] for key in keys]), device=check.device,
                              autocast_dtype=check.autocast_dtype)
        gain = torch.cat([losses_before(key) for key in keys]) - after
        n_own = check.windows[keys[0]].shape[0]
        own, other = gain[:n_own], gain[n_own:]
        out.append(Gains(0.0, -float(own.mean()), 0.0, -float(other.mean()), own=own, other=other))
    return out


def step_sketch(base_state: dict[str, Tensor], new_state: dict[str, Tensor], *, seed: int,
                dim: int = DEFAULT_DIM) -> Tensor | None:
    """The sketch of a public outer step θ_{r−1} − θ_r (None when it is not finite)."""
    step = {k: base_state[k].float() - new_state[k].float() for k in base_state}
    s = sketch(step, seed=seed, dim=dim)
    return s if all(math.isfinite(x) for x in s.tolist()) else None
