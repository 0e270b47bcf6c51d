"""What the server knows to judge a round's updates as work (``diloco.contributions``), and what it keeps.

The checks run inside ``diloco.round.outer_round`` between screening and aggregation; this module builds
their input from the database and storage:

- the windows each update is scored on: a few of the windows its task trained on (redrawn from the task's
  seed, ``diloco.contributions.add_trained_windows``) and a few of each of the other shards
  (``diloco.contributions.shard_windows``), picked by a seed the workers cannot know (derived from
  ``SECRET_KEY``, the run and the round), over the same documents the agents train on (the train split
  after the data-filter guardrails in force);
- the last public outer step θ_{r−1} − θ_r, which a round too small or too early for the centre judges
  updates against (read from the checkpoints only when such a round needs it);
- what it may not repeat: the sha256 and sketch of every earlier update of the run and the sketch of every
  accepted public outer step. Sketches use one secret seed per run, so they compare across rounds.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json

from django.conf import settings

from diloco.contributions import ContributionCheck, add_trained_windows, other_keys, shard_windows
from diloco.data import encode_documents, load_documents, shard_documents, split_documents
from diloco.guardrails import filter_documents
from diloco.replay import Earlier, sketch_from_json
from governance.selectors import guardrails_active
from training import blobs
from training.models import Round, Task, TrainingRun
from training.services import datasets


def _secret_int(label: str) -> int:
    digest = hmac.new(settings.SECRET_KEY.encode(), label.encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sketch_seed(run_id: int) -> int:
    """The run's secret sketch seed: the same every round, unknown to the workers."""
    return _secret_int(f"agora:sketch:{run_id}")


def windows_seed(run_id: int, round_index: int) -> int:
    return _secret_int(f"agora:score-windows:{run_id}:{round_index}")


def enabled() -> bool:
    return bool(getattr(settings, "AGORA_SCORE_CONTRIBUTIONS", True))


@functools.lru_cache(maxsize=4)
def _train_documents(source: str, sha256: str | None, fraction: float, guardrails_json: str, cache_dir: str,
                     policy) -> tuple[str, ...]:
    docs = load_documents(source, sha256, cache_dir=cache_dir, policy=policy)
    train = split_documents(docs, fraction)[0]
    return tuple(filter_documents(train, json.loads(guardrails_json))[0])


@functools.lru_cache(maxsize=64)
def _shard_tokens(source, sha256, fraction, guardrails_json, cache_dir, policy, index: int, count: int):
    docs = list(_train_documents(source, sha256, fraction, guardrails_json, cache_dir, policy))
    return encode_documents(shard_documents(docs, index, count))


def shard_tokens(dataset: dict, index: int, count: int, guardrails: list[dict]):
    """Shard ``index`` of ``count`` of the run's train split, after ``guardrails``: what an agent trains on."""
    return _shard_tokens(dataset["source"], dataset.get("sha256"), float(dataset.get("heldout_fraction", 0.1)),
                         json.dumps(guardrails, sort_keys=True), str(settings.VAR_DIR / "datasets"), blobs.dataset_policy(),
                         int(index), int(count))


def clear_caches() -> None:
    _train_documents.cache_clear()
    _shard_tokens.cache_clear()


# Sketches are compared over this many latest rounds (hashes over the whole run): a round's check reads
# at most a few thousand small vectors, however long the run.
SKETCH_ROUNDS = 64


def _earlier(run: TrainingRun, rnd: Round, dim: int) -> list[Earlier]:
    earlier = []
    since = rnd.index - SKETCH_ROUNDS
    rows = (Task.objects.filter(round__run_id=run.pk, round__index__lt=rnd.index).exclude(update_sha256="")
            .order_by("round__index", "id").values_list("id", "round__index", "update_sha256"))
    sketches = dict(Task.objects.filter(round__run_id=run.pk, round__index__lt=rnd.index, round__index__gte=since,
                                        update_sketch__isnull=False).values_list("id", "update_sketch"))
    for task_id, index, sha in rows:
        earlier.append(Earlier(f"task {task_id} of round {index}", _sketch_or_none(sketches.get(task_id), dim), sha))
    steps = (Round.objects.filter(run_id=run.pk, index__lt=rnd.index, index__gte=since, accepted=True,
                                  step_sketch__isnull=False).order_by("index").values_list("index", "step_sketch"))
    for index, sketch in steps:
        s = _sketch_or_none(sketch, dim)
        if s is not None:
            earlier.append(Earlier(f"the public outer step of round {index}", s))
    return earlier


def _sketch_or_none(values, dim: int):
    if values is None:
        return None
    try:
        return sketch_from_json(values, dim=dim)
    except ValueError:
        return None


def _public_step(run: TrainingRun, rnd: Round) -> dict | None:
    """θ_{r−1} − θ_r: the outer step that made this round's checkpoint, as anyone can compute it from the
    published checkpoints (None when the round starts from the run's first checkpoint)."""
    prev = (Round.objects.filter(run_id=run.pk, index__lt=rnd.index, accepted=True, checkpoint_out_id=rnd.checkpoint_in_id)
            .exclude(checkpoint_in_id=rnd.checkpoint_in_id).order_by("-index").first())
    if prev is None or prev.checkpoint_in_id is None:
        return None
    before = blobs.checkpoint_state(prev.checkpoint_in_id)[0]
    after = blobs.checkpoint_state(rnd.checkpoint_in_id)[0]
    if set(before) != set(after):
        return None
    return {k: before[k].float() - after[k].float() for k in after}


def _seed_steps(task: Task, diloco: dict) -> int:
    """How many of the task's inner steps drew their batches from its seed. An overlapping agent trains the
    first ``overlap_steps`` ahead, on the previous task's batches, so only the rest came from this task's seed;
    they are the ones its own windows are drawn from. A claim is bounded to 0..H-1 and only counts in an
    overlap run; claiming more leaves fewer windows to score, never an easier test."""
    steps = int(diloco["inner_steps"])
    ahead = (task.metrics or {}).get("overlap_steps") if diloco.get("overlap") else None
    if not isinstance(ahead, int) or isinstance(ahead, bool) or ahead <= 0:
        return steps
    return steps - min(ahead, steps - 1)


def contribution_check(*, run: TrainingRun, rnd: Round, tasks: list[Task], device: str,
                       autocast_dtype) -> ContributionCheck:
    """The ``ContributionCheck`` of a round about to be aggregated (update ids are task ids)."""
    d = run.diloco
    count = int(d["workers_per_round"])
    seq_len = int(d["seq_len"])
    n_windows = int(getattr(settings, "AGORA_SCORE_WINDOWS", 32))
    guardrails = guardrails_active(kind="data_filter")
    prepared = datasets.run_dataset(run)
    tokens = {s: (shard_tokens(run.spec["dataset"], s, count, guardrails) if prepared is None
                  else datasets.run_shard_tokens(run, prepared, s, guardrails)) for s in range(count)}
    seed = windows_seed(run.pk, rnd.index)
    windows = shard_windows(tokens, count=n_windows, seq_len=seq_len, seed=seed, own=False)
    own = add_trained_windows(windows, {t.pk: (t.shard_index, t.seed, _seed_steps(t, d)) for t in tasks}, tokens,
                              steps=int(d["inner_steps"]), batch_size=int(d["batch_size"]), seq_len=seq_len,
                              count=n_windows, seed=seed)
    other = {t.pk: other_keys(t.shard_index, count, windows) for t in tasks}
    check = ContributionCheck(
        arch=run.spec["model"]["arch"], config=run.spec["model"]["config"], windows=windows, own=own, other=other,
        sketch_seed=sketch_seed(run.pk), sha256={t.pk: t.update_sha256 for t in tasks},
        replay_threshold=float(getattr(settings, "AGORA_REPLAY_COSINE", 0.99)),
        public_step=functools.partial(_public_step, run, rnd), device=device, autocast_dtype=autocast_dtype)
    check.earlier = _earlier(run, rnd, check.sketch_dim)
    if run.spec["model"].get("lora"):
        # Scoring builds full models from the update; a LoRA update is adapters over a frozen base: replay
        # checks only (screening, aggregation and the evaluation gate still judge the round).
        check.score = False
    if any(t.pk not in own or not other[t.pk] for t in tasks):
        # Some shard has too few tokens for one window, or no other shard has any: replay checks only.
        check.score = False
    return check
