"""Community models, their checkpoints, and the DiLoCo training runs that produce them.

A run has T rounds; each round hands out k tasks (one per data shard) to volunteer workers, collects
their pseudo-gradients, aggregates them once and writes the next checkpoint. Blobs (checkpoints, worker
updates, the outer optimizer state) live in ``storages["checkpoints"]``; the rows here only point at
them. Checkpoints are content addressed: the primary key is the sha256 of the safetensors bytes.
"""

from __future__ import annotations

from django.db import models
from django.urls import reverse
from django.utils import timezone


class CommunityModel(models.Model):
    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=120)
    description = models.TextField(blank=True)
    arch = models.CharField(max_length=32)
    config = models.JSONField(default=dict)
    current_checkpoint = models.ForeignKey(
        "training.Checkpoint", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug

    def get_absolute_url(self) -> str:
        return reverse("training:model_detail", args=[self.slug])


class Checkpoint(models.Model):
    """Weights as safetensors (``diloco.checkpoint``), stored at ``<sha[:2]>/<sha>.safetensors``."""

    sha256 = models.CharField(max_length=64, primary_key=True)
    model = models.ForeignKey(CommunityModel, on_delete=models.PROTECT, related_name="checkpoints")
    size = models.PositiveBigIntegerField()
    created_at = models.DateTimeField(default=timezone.now)
    run = models.ForeignKey(
        "training.TrainingRun", on_delete=models.SET_NULL, null=True, blank=True, related_name="checkpoints"
    )
    round = models.ForeignKey(
        "training.Round", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    note = models.CharField(max_length=200, blank=True)
    eval_loss = models.FloatField(null=True, blank=True)
    metrics = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.model_id}@{self.sha256[:12]}"

    def get_absolute_url(self) -> str:
        return reverse("api-checkpoint", args=[self.sha256])

    @property
    def storage_name(self) -> str:
        return checkpoint_storage_name(self.sha256)


def checkpoint_storage_name(sha256: str) -> str:
    return f"{sha256[:2]}/{sha256}.safetensors"


class ModelVersion(models.Model):
    """A published state of a community model: an imported directory, or an accepted round's checkpoint.

    Numbers count up per model and are never reused. Runs of one model branch: each starts from the
    model's latest version at that moment (``parent`` of its first version), and every accepted round of
    any run becomes the next number, so no run's result replaces another's. For a LoRA run the checkpoint
    holds only adapter weights; ``lora_base`` is the full version they apply to, and readers merge the two
    (``training.services.versions.version_state``).
    """

    model = models.ForeignKey(CommunityModel, on_delete=models.PROTECT, related_name="versions")
    number = models.PositiveIntegerField()
    checkpoint = models.ForeignKey(Checkpoint, on_delete=models.PROTECT, related_name="versions")
    arch = models.CharField(max_length=32)
    config = models.JSONField(default=dict)
    vocab_size = models.PositiveIntegerField(null=True, blank=True)
    tokenizer_sha256 = models.CharField(max_length=64, blank=True, help_text="Empty: byte-level (256 tokens).")
    parent = models.ForeignKey("self", on_delete=models.PROTECT, null=True, blank=True, related_name="children")
    lora = models.JSONField(null=True, blank=True, help_text="The adapters' spec when the checkpoint holds adapters.")
    lora_base = models.ForeignKey("self", on_delete=models.PROTECT, null=True, blank=True, related_name="+")
    run = models.ForeignKey("training.TrainingRun", on_delete=models.SET_NULL, null=True, blank=True,
                            related_name="versions")
    round = models.ForeignKey("training.Round", on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    eval_loss = models.FloatField(null=True, blank=True)
    source = models.CharField(max_length=200, blank=True, help_text="Where an imported version came from.")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["model", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["model", "number"], name="training_version_unique_number"),
            models.CheckConstraint(condition=models.Q(number__gte=1), name="training_version_number_positive"),
            models.CheckConstraint(condition=models.Q(lora__isnull=True) | models.Q(lora_base__isnull=False),
                                   name="training_version_lora_has_base"),
        ]

    def __str__(self) -> str:
        return f"{self.model_id} v{self.number}"

    @property
    def label(self) -> str:
        return f"v{self.number}"


class TrainingRun(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        RUNNING = "running", "Running"
        FINISHED = "finished", "Finished"
        FAILED = "failed", "Failed"
        CANCELED = "canceled", "Canceled"

    proposal = models.OneToOneField(
        "governance.Proposal", on_delete=models.PROTECT, related_name="training_run"
    )
    model = models.ForeignKey(CommunityModel, on_delete=models.PROTECT, related_name="runs")
    spec = models.JSONField(help_text="The proposal's frozen spec.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    total_rounds = models.PositiveIntegerField()
    current_round = models.PositiveIntegerField(default=0, help_text="Index of the latest round (1-based).")
    # Denormalised from the spec so claims can filter on them in SQL.
    min_vram_mb = models.PositiveIntegerField(default=0)
    allow_cpu = models.BooleanField(default=False)
    base_checkpoint = models.ForeignKey(Checkpoint, on_delete=models.PROTECT, related_name="+")
    final_checkpoint = models.ForeignKey(
        Checkpoint, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    # The model version the run branched from (None: from scratch). Its first accepted round's version
    # names this one as its parent; a LoRA run's adapters apply to it.
    base_version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, null=True, blank=True, related_name="+")
    # The outer optimizer's momentum, never served publicly; replaced after every accepted round.
    outer_state_name = models.CharField(max_length=300, blank=True)
    outer_state_sha256 = models.CharField(max_length=64, blank=True)
    reason = models.TextField(blank=True, help_text="Why the run failed or was canceled (public).")
    # Round attempts that failed for want of results (``diloco.max_failed_rounds`` bounds them).
    failed_rounds = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["status"], name="training_run_status")]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(status__in=["pending", "running", "finished", "failed", "canceled"]),
                name="training_run_status_valid",
            ),
            models.CheckConstraint(condition=models.Q(total_rounds__gte=1), name="training_run_rounds_positive"),
            models.CheckConstraint(
                condition=models.Q(current_round__lte=models.F("total_rounds")), name="training_run_round_in_range"
            ),
            models.CheckConstraint(
                condition=~models.Q(status="finished") | models.Q(final_checkpoint__isnull=False),
                name="training_run_finished_has_checkpoint",
            ),
        ]

    def __str__(self) -> str:
        return f"run {self.pk} of {self.model_id}"

    def get_absolute_url(self) -> str:
        return reverse("training:run_detail", args=[self.pk])

    @property
    def ledger_subject(self) -> str:
        return f"run:{self.pk}"

    @property
    def diloco(self) -> dict:
        return self.spec["diloco"]

    @property
    def is_active(self) -> bool:
        return self.status in (self.Status.PENDING, self.Status.RUNNING)


class Round(models.Model):
    class Status(models.TextChoices):
        OPEN = "open", "Open"
        AGGREGATING = "aggregating", "Aggregating"
        DONE = "done", "Done"
        REJECTED = "rejected", "Rejected"
        FAILED = "failed", "Failed"
        CANCELED = "canceled", "Canceled"

    run = models.ForeignKey(TrainingRun, on_delete=models.CASCADE, related_name="rounds")
    index = models.PositiveIntegerField(help_text="1-based.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OPEN)
    checkpoint_in = models.ForeignKey(Checkpoint, on_delete=models.PROTECT, related_name="+")
    checkpoint_out = models.ForeignKey(Checkpoint, on_delete=models.PROTECT, null=True, blank=True, related_name="+")
    opened_at = models.DateTimeField(default=timezone.now)
    deadline = models.DateTimeField()
    # A round that gets too few results within ``diloco.max_round_extensions`` extensions fails; unless
    # the run has used up ``diloco.max_failed_rounds``, the same round starts its next attempt.
    attempt = models.PositiveIntegerField(default=1)
    extensions = models.PositiveIntegerField(default=0, help_text="Deadline extensions in this attempt.")
    # Aggregation claims the round (status aggregating + a fresh token), works outside the lock and
    # commits only if the token is still its own: a round is aggregated exactly once. The claim is a
    # lease the aggregation renews while it works; a lapsed lease is taken over by the next check.
    aggregation_token = models.CharField(max_length=32, blank=True)
    aggregation_started_at = models.DateTimeField(null=True, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    aggregated_at = models.DateTimeField(null=True, blank=True)
    aggregator = models.CharField(max_length=32, blank=True)
    eval_loss_before = models.FloatField(null=True, blank=True)
    eval_loss_after = models.FloatField(null=True, blank=True)
    accepted = models.BooleanField(null=True, blank=True)
    reason = models.TextField(blank=True)
    outer_state_name = models.CharField(max_length=300, blank=True)
    timings = models.JSONField(default=dict, blank=True)
    # The count sketch of the public outer step θ_in − θ_out of an accepted round (see ``diloco.replay``).
    step_sketch = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["run", "index"]
        constraints = [
            models.UniqueConstraint(fields=["run", "index"], name="training_round_unique_index"),
            models.CheckConstraint(condition=models.Q(index__gte=1), name="training_round_index_positive"),
            models.CheckConstraint(
                condition=models.Q(status__in=["open", "aggregating", "done", "rejected", "failed", "canceled"]),
                name="training_round_status_valid",
            ),
            models.CheckConstraint(
                condition=~models.Q(status="done") | models.Q(checkpoint_out__isnull=False),
                name="training_round_done_has_checkpoint",
            ),
        ]

    def __str__(self) -> str:
        return f"run {self.run_id} round {self.index}"

    @property
    def is_closed(self) -> bool:
        return self.status in (self.Status.DONE, self.Status.REJECTED, self.Status.FAILED, self.Status.CANCELED)


class Task(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        ASSIGNED = "assigned", "Assigned"
        COMPLETED = "completed", "Completed"
        FAILED = "failed", "Failed"
        EXPIRED = "expired", "Expired"
        REJECTED = "rejected", "Rejected"
        ACCEPTED = "accepted", "Accepted"

    round = models.ForeignKey(Round, on_delete=models.CASCADE, related_name="tasks")
    worker = models.ForeignKey(
        "marketplace.Worker", on_delete=models.PROTECT, null=True, blank=True, related_name="training_tasks"
    )
    shard_index = models.PositiveIntegerField()
    seed = models.BigIntegerField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    deadline = models.DateTimeField()
    replaces = models.ForeignKey("self", on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    # Spot re-computation (``diloco.replica``): a replica is the same work (checkpoint, shard, seed, inner
    # settings) given to a second worker; it points at the shard's first task. ``replica_check`` holds the
    # comparison of the pair once the round is aggregated (on both tasks): agreed, cosine, norm difference,
    # the other task and, for a disagreeing pair, which one was kept.
    replica_of = models.ForeignKey("self", on_delete=models.SET_NULL, null=True, blank=True, related_name="replicas")
    replica_check = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    claimed_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    update_name = models.CharField(max_length=300, blank=True)
    update_sha256 = models.CharField(max_length=64, blank=True)
    update_size = models.PositiveBigIntegerField(null=True, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    reason = models.TextField(blank=True, help_text="Why it failed, expired or was rejected.")
    update_norm = models.FloatField(null=True, blank=True)
    update_cosine = models.FloatField(null=True, blank=True)
    credit = models.DecimalField(max_digits=14, decimal_places=4, null=True, blank=True)
    # Contribution checks (``diloco.contributions``): the losses on its own shard and on another before and
    # after the update, the verdict and the closest earlier update's cosine; and the update's count sketch,
    # which later rounds compare against to catch replays.
    score = models.JSONField(null=True, blank=True)
    update_sketch = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["round", "shard_index", "id"]
        indexes = [models.Index(fields=["status", "created_at"], name="training_task_status_created")]
        constraints = [
            # A worker whose task failed or expired may take another task of the round; it never holds
            # two live ones (assigned, or with a result) in the same round.
            models.UniqueConstraint(
                fields=["round", "worker"],
                condition=models.Q(worker__isnull=False) & ~models.Q(status__in=["failed", "expired"]),
                name="training_task_one_live_per_worker_per_round",
            ),
            models.CheckConstraint(
                condition=models.Q(
                    status__in=["pending", "assigned", "completed", "failed", "expired", "rejected", "accepted"]
                ),
                name="training_task_status_valid",
            ),
            models.CheckConstraint(
                condition=~models.Q(status__in=["assigned", "completed", "failed", "rejected", "accepted"])
                | models.Q(worker__isnull=False),
                name="training_task_claimed_has_worker",
            ),
            models.CheckConstraint(
                condition=~models.Q(status__in=["completed", "rejected", "accepted"]) | ~models.Q(update_sha256=""),
                name="training_task_result_has_update",
            ),
        ]

    def __str__(self) -> str:
        return f"task {self.pk} (round {self.round_id}, shard {self.shard_index})"

    @property
    def ledger_subject(self) -> str:
        return f"task:{self.pk}"


class DatasetBlob(models.Model):
    """A tokenizer (``tokenizer.json``) or a token shard (``diloco.data``), content addressed in blob storage.

    Agents fetch them by sha256 like checkpoints (``/api/v1/tokenizers/<sha256>``, ``/api/v1/shards/<sha256>``).
    """

    class Kind(models.TextChoices):
        TOKENIZER = "tokenizer", "Tokenizer"
        SHARD = "shard", "Token shard"

    sha256 = models.CharField(max_length=64, primary_key=True)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    size = models.PositiveBigIntegerField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(condition=models.Q(kind__in=["tokenizer", "shard"]),
                                   name="training_datasetblob_kind_valid"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.sha256[:12]}"

    @property
    def storage_name(self) -> str:
        return dataset_blob_storage_name(self.kind, self.sha256)


def dataset_blob_storage_name(kind: str, sha256: str) -> str:
    suffix = "json" if kind == DatasetBlob.Kind.TOKENIZER else "safetensors"
    return f"datasets/{kind}s/{sha256[:2]}/{sha256}.{suffix}"


class PreparedDataset(models.Model):
    """A run's data, loaded once, filtered, tokenized and cut into one shard per worker slot plus the held-out
    split (``training.services.datasets``). ``guardrails`` lists how many documents each data filter removed."""

    run = models.OneToOneField(TrainingRun, on_delete=models.CASCADE, related_name="prepared_dataset")
    source = models.CharField(max_length=2000)
    format = models.CharField(max_length=16)
    field = models.CharField(max_length=128, blank=True, help_text="The jsonl field or parquet column.")
    raw_sha256 = models.CharField(max_length=64)
    tokenizer_kind = models.CharField(max_length=16)
    tokenizer = models.ForeignKey(DatasetBlob, on_delete=models.PROTECT, null=True, blank=True, related_name="+",
                                  help_text="Empty for the byte tokenizer.")
    vocab_size = models.PositiveIntegerField()
    shards = models.JSONField(help_text="Per shard index: sha256, size, tokens, documents, bytes.")
    heldout = models.JSONField(help_text="The held-out shard: sha256, size, tokens, documents, bytes.")
    documents = models.JSONField(help_text="Document counts: loaded, train, heldout, kept_train, kept_heldout.")
    guardrails = models.JSONField(default=list, help_text="Per data filter: id, title, removed_train, removed_heldout.")
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"dataset of run {self.run_id}"

    @property
    def tokenizer_sha256(self) -> str:
        return self.tokenizer_id or ""

    def shard_sha256(self, index: int) -> str:
        return self.shards[index]["sha256"]
