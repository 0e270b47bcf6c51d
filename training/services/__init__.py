"""Training services, one module per subject:

- ``checkpoints``: community models and their weights (``community_model_ensure``).
- ``runs``: runs from approved proposals (``run_start``, ``runs_start_approved``), ``run_cancel``.
- ``assignment``: a worker's task (``task_claim``, ``task_submit_result``, ``task_fail``, ``task_stop_reason``).
- ``rounds``: deadlines, extensions, failed attempts and the aggregation lease (``round_check``, …).
- ``aggregation``: a round aggregated exactly once through ``diloco.round`` (``round_aggregate``).
- ``datasets``: a run's data filtered, tokenized and sharded once when it starts (``dataset_build``,
  ``dataset_record``), read back for evaluation and scoring, and imported tokenizers (``tokenizer_store``).

Callers use the package (``from training import services; services.task_claim(...)``). No module here
imports ``training.tasks``: after a result commits, ``training.signals.round_result_stored`` asks for the
round check.
"""

from training.services.aggregation import (
    CREDIT_PER_TOKEN,
    EVAL_BATCHES,
    EVAL_TOLERANCE,
    MAX_NORM_RATIO,
    eval_device,
    eval_precision,
    round_aggregate,
)
from training.services.assignment import (
    LIVE_TASK_STATUSES,
    max_upload_bytes,
    task_claim,
    task_fail,
    task_for_worker,
    task_stop_reason,
    task_submit_result,
    update_validate,
)
from training.services.checkpoints import community_model_ensure
from training.services.rounds import (
    AGGREGATION_STALE_S,
    DEFAULT_MAX_FAILED_ROUNDS,
    DEFAULT_MAX_ROUND_EXTENSIONS,
    aggregation_lease_s,
    round_check,
    round_expire_late_tasks,
    round_extend_if_starved,
    round_take_over_if_lapsed,
    rounds_open_ids,
    rounds_release_stale,
)
from training.services.runs import MAX_CANCEL_REASON, run_cancel, run_start, runs_start_approved
from training.services.versions import model_import, version_latest, version_state

__all__ = [
    "AGGREGATION_STALE_S", "CREDIT_PER_TOKEN", "DEFAULT_MAX_FAILED_ROUNDS", "DEFAULT_MAX_ROUND_EXTENSIONS",
    "EVAL_BATCHES", "EVAL_TOLERANCE", "LIVE_TASK_STATUSES", "MAX_CANCEL_REASON", "MAX_NORM_RATIO",
    "aggregation_lease_s", "community_model_ensure", "model_import", "version_latest", "version_state", "eval_device", "eval_precision", "max_upload_bytes",
    "round_aggregate", "round_check", "round_expire_late_tasks", "round_extend_if_starved",
    "round_take_over_if_lapsed", "rounds_open_ids", "rounds_release_stale", "run_cancel", "run_start",
    "runs_start_approved", "task_claim", "task_fail", "task_for_worker", "task_stop_reason",
    "task_submit_result", "update_validate",
]
