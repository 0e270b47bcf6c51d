"""Shapes of the worker protocol and the member API. No business rules here."""

from __future__ import annotations

import math

from django.urls import reverse
from rest_framework import serializers

from core.fields import FiniteFloatField, StrictIntegerField
from diloco.codecs import DENSITY
from diloco.sparse import momentum_roles
from governance.specs import SPARSE_CHUNK_BEFORE
from training.models import Checkpoint, PreparedDataset, Round, Task, TrainingRun
from training.services.replicas import task_optimizer


def _task_model(run: TrainingRun, request) -> dict:
    """The task's model: arch and config, and for a LoRA run the adapters' spec and the frozen base weights
    (the task's checkpoint then holds the adapters only)."""
    from training.services.versions import run_lora, run_lora_base_sha256

    spec = run.spec["model"]
    model = {"arch": spec["arch"], "config": spec["config"]}
    lora = run_lora(run)
    if lora is not None:
        base = run_lora_base_sha256(run)
        model.update(lora=lora.to_dict(), lora_base_sha256=base,
                     lora_base_url=request.build_absolute_uri(reverse("api-checkpoint", args=[base])))
    return model


def task_payload(task: Task, *, request, guardrails: list[dict], max_upload_bytes: int) -> dict:
    """The task JSON of worker protocol v1 (see contracts: the agent relies on every key)."""
    rnd = task.round
    run = rnd.run
    spec, d = run.spec, run.diloco
    ds = spec["dataset"]
    payload = {
        "id": task.pk,
        "run_id": run.pk,
        "round": rnd.index,
        "checkpoint_sha256": rnd.checkpoint_in_id,
        "checkpoint_url": request.build_absolute_uri(reverse("api-checkpoint", args=[rnd.checkpoint_in_id])),
        "model": _task_model(run, request),
        "dataset": {
            "source": ds["source"],
            "sha256": ds.get("sha256"),
            "heldout_fraction": ds.get("heldout_fraction", 0.1),
            "shard_index": task.shard_index,
            "shard_count": int(d["workers_per_round"]),
        },
        "inner": {
            "steps": d["inner_steps"],
            "lr": d["inner_lr"],
            "batch_size": d["batch_size"],
            "seq_len": d["seq_len"],
            "weight_decay": d["weight_decay"],
            "warmup": d["warmup"],
            "grad_clip": d["grad_clip"],
        },
        "compression": d["compression"],
        # Sparse codecs: the share of each chunk sent, and the decay of the worker's error feedback.
        "density": d.get("density", DENSITY),
        # and the chunk that share is taken from (runs from before the setting: 4096, what agents always used)
        "sparse_chunk": d.get("sparse_chunk", SPARSE_CHUNK_BEFORE),
        "error_feedback_beta": momentum_roles(d["compression"], d["outer_momentum"])[1],
        "guardrails": guardrails,
        "seed": task.seed,
        # "fresh": start AdamW afresh for this task rather than resume the agent's saved state (spot checks).
        "optimizer": task_optimizer(task),
        "deadline": task.deadline.isoformat(),
        "max_upload_bytes": max_upload_bytes,
        "overlap": bool(d.get("overlap", False)),
    }
    from training.services.deltas import delta_fields

    # A published step that rebuilds this checkpoint from the previous one (both null when there is none).
    payload.update(delta_fields(rnd.checkpoint_in))
    from training.services.datasets import task_dataset_payload

    return task_dataset_payload(payload, run=run, shard_index=task.shard_index, request=request)


# Bounds on what a worker reports. Far beyond any real value (a cross-entropy loss is ln(vocabulary) at
# chance, a task runs for hours), yet small enough that sums and means over many tasks stay finite and
# every integer is exact in a double, so the run page, the API and the ledger keep them as sent.
METRICS_LOSS_MAX = 1e6
METRICS_STEPS_MAX = 10**9
METRICS_TOKENS_MAX = 10**15
METRICS_SECONDS_MAX = 1e7


class MetricsSerializer(serializers.Serializer):
    loss_start = FiniteFloatField(min_value=0, max_value=METRICS_LOSS_MAX)
    loss_end = FiniteFloatField(min_value=0, max_value=METRICS_LOSS_MAX)
    steps = StrictIntegerField(min_value=0, max_value=METRICS_STEPS_MAX)
    tokens = StrictIntegerField(min_value=0, max_value=METRICS_TOKENS_MAX)
    seconds = FiniteFloatField(min_value=0, max_value=METRICS_SECONDS_MAX)
    tokens_per_s = FiniteFloatField(min_value=0, max_value=METRICS_TOKENS_MAX, required=False,
                                    help_text="training throughput of this task on the agent's device")
    # Utilisation and traffic (optional; agents before 0.3 do not send them).
    compute_seconds = FiniteFloatField(min_value=0, max_value=METRICS_SECONDS_MAX, required=False,
                                       help_text="seconds spent training for this task's update")
    wall_seconds = FiniteFloatField(min_value=0, max_value=METRICS_SECONDS_MAX, required=False,
                                    help_text="seconds of the agent's round: from the end of its previous round "
                                              "(or this claim) to the end of this task's training")
    utilisation = FiniteFloatField(min_value=0, max_value=1, required=False,
                                   help_text="compute_seconds / wall_seconds")
    bytes_sent = StrictIntegerField(min_value=0, max_value=METRICS_TOKENS_MAX, required=False)
    bytes_received = StrictIntegerField(min_value=0, max_value=METRICS_TOKENS_MAX, required=False)
    checkpoint_via = serializers.ChoiceField(choices=["cache", "delta", "full"], required=False,
                                             help_text="how the agent got the task's checkpoint")
    base_checkpoint_sha256 = serializers.RegexField(r"^[0-9a-f]{64}$", required=False,
                                                    help_text="the checkpoint the update is measured from; "
                                                              "must be the task's checkpoint_sha256")
    overlap_steps = StrictIntegerField(min_value=0, max_value=METRICS_STEPS_MAX, required=False,
                                       help_text="inner steps trained before the task arrived, from the previous "
                                                 "round's weights (overlap), then moved onto this checkpoint")
    overlap_from_round = StrictIntegerField(min_value=0, max_value=METRICS_STEPS_MAX, required=False)


class TaskFailSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=1000, allow_blank=True, required=False, default="")


class ResultAcceptedSerializer(serializers.Serializer):
    accepted_for_aggregation = serializers.BooleanField()
    task_id = serializers.IntegerField()
    update_sha256 = serializers.CharField()


class StoredFloatField(serializers.FloatField):
    """A stored float as JSON: NaN and infinities (a diverged evaluation, an overflowing norm) become null,
    since JSON has no spelling for them and one such value would fail the whole response."""

    def to_representation(self, value):
        value = super().to_representation(value)
        return value if math.isfinite(value) else None


class CheckpointRefSerializer(serializers.ModelSerializer):
    url = serializers.SerializerMethodField()
    eval_loss = StoredFloatField(allow_null=True, read_only=True)

    class Meta:
        model = Checkpoint
        fields = ["sha256", "size", "created_at", "eval_loss", "url"]

    def get_url(self, obj) -> str:
        request = self.context.get("request")
        path = reverse("api-checkpoint", args=[obj.sha256])
        return request.build_absolute_uri(path) if request else path


class TaskSummarySerializer(serializers.ModelSerializer):
    worker_id = serializers.IntegerField(allow_null=True)
    worker_name = serializers.SerializerMethodField()
    update_norm = StoredFloatField(allow_null=True, read_only=True)
    score = serializers.JSONField(
        read_only=True, allow_null=True,
        help_text="The contribution check: passed, reason, own_gain and other_gain (loss drop on its own shard's "
                  "and another shard's windows), score (own_gain - other_gain), the losses before and after, "
                  "replay_max_cosine (closest earlier update or public step); for a replay, replay_of. Null "
                  "when the update was not checked.")
    replica_of = serializers.IntegerField(
        source="replica_of_id", allow_null=True, read_only=True,
        help_text="Spot re-computation: the task this one repeats (same checkpoint, shard, seed); null for a first "
                  "task. Replicas of a round still open are not listed.")
    replica_check = serializers.JSONField(
        read_only=True, allow_null=True,
        help_text="The comparison with the other task of the same work, once the round is aggregated: agreed "
                  "(null when they could not be compared), cosine, norm_rel (relative norm difference), reason, "
                  "other_task, first_task, replica_task and, for a disagreeing pair, kept and why.")

    class Meta:
        model = Task
        fields = ["id", "shard_index", "status", "worker_id", "worker_name", "claimed_at", "completed_at",
                  "update_sha256", "metrics", "reason", "update_norm", "credit", "score", "replica_of",
                  "replica_check"]

    def get_worker_name(self, obj) -> str | None:
        return obj.worker.name if obj.worker_id else None


class RoundSerializer(serializers.ModelSerializer):
    checkpoint_in = serializers.CharField(source="checkpoint_in_id")
    checkpoint_out = serializers.CharField(source="checkpoint_out_id", allow_null=True)
    tasks = TaskSummarySerializer(many=True)
    eval_loss_before = StoredFloatField(allow_null=True, read_only=True)
    eval_loss_after = StoredFloatField(allow_null=True, read_only=True)

    class Meta:
        model = Round
        fields = ["index", "status", "attempt", "extensions", "opened_at", "deadline", "aggregated_at", "aggregator",
                  "checkpoint_in",
                  "checkpoint_out", "eval_loss_before", "eval_loss_after", "accepted", "reason", "timings", "tasks"]


class RunListSerializer(serializers.ModelSerializer):
    model = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    proposal_id = serializers.IntegerField()
    url = serializers.SerializerMethodField()

    class Meta:
        model = TrainingRun
        fields = ["id", "url", "proposal_id", "model", "status", "current_round", "total_rounds", "created_at",
                  "finished_at"]

    def get_url(self, obj) -> str:
        request = self.context.get("request")
        path = reverse("api-run-detail", args=[obj.pk])
        return request.build_absolute_uri(path) if request else path


class ContributorSerializer(serializers.Serializer):
    worker_id = serializers.IntegerField()
    name = serializers.CharField()
    owner = serializers.CharField()
    accepted = serializers.IntegerField()
    rejected = serializers.IntegerField()
    credits = serializers.DecimalField(max_digits=14, decimal_places=4)
    utilisation = serializers.FloatField(allow_null=True, read_only=True,
                                         help_text="compute seconds / wall seconds over the rounds it reported")
    bytes_sent = serializers.IntegerField(read_only=True)
    bytes_received = serializers.IntegerField(read_only=True)


class LossPointSerializer(serializers.Serializer):
    round = serializers.IntegerField()
    heldout = serializers.FloatField(allow_null=True)
    train = serializers.FloatField(allow_null=True)
    accepted = serializers.BooleanField(allow_null=True)
    heldout_bpb = serializers.FloatField(
        allow_null=True, read_only=True, default=None,
        help_text="the held-out loss in bits per UTF-8 byte of text, comparable across tokenizers")


class PreparedDatasetSerializer(serializers.ModelSerializer):
    tokenizer_sha256 = serializers.CharField(read_only=True, help_text="empty for the byte tokenizer")
    shards = serializers.JSONField(help_text="per shard index: sha256, size, tokens, documents, bytes")
    heldout = serializers.JSONField(help_text="the held-out shard: sha256, size, tokens, documents, bytes")
    documents = serializers.JSONField(help_text="loaded, train, heldout, kept_train, kept_heldout")
    guardrails = serializers.JSONField(help_text="per data filter in force: id, title, removed_train, removed_heldout")

    class Meta:
        model = PreparedDataset
        fields = ["source", "format", "field", "raw_sha256", "tokenizer_kind", "tokenizer_sha256", "vocab_size",
                  "shards", "heldout", "documents", "guardrails", "created_at"]


class RunDetailSerializer(RunListSerializer):
    spec = serializers.JSONField()
    dataset = PreparedDatasetSerializer(
        source="prepared_dataset", read_only=True, allow_null=True,
        help_text="The data the server prepared once (null for a byte-level run on the built-in corpus).")
    base_checkpoint = CheckpointRefSerializer()
    final_checkpoint = CheckpointRefSerializer(allow_null=True)
    rounds = RoundSerializer(many=True)
    losses = LossPointSerializer(many=True)
    contributors = ContributorSerializer(many=True)

    class Meta(RunListSerializer.Meta):
        fields = RunListSerializer.Meta.fields + ["reason", "spec", "base_checkpoint", "final_checkpoint", "rounds",
                                                  "losses", "contributors", "dataset"]


class RunCancelInput(serializers.Serializer):
    reason = serializers.CharField(max_length=2000, help_text="Published in the ledger with the cancellation.")
