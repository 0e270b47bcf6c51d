"""The worker registry: enrollment tokens, workers (a volunteer's machine) and compute credits.

Secrets (enrollment tokens, worker tokens) are never stored: only their sha256 hex digest is. The
live state of a worker (online, busy, paused, offline) is not a column either: it lives in the cache
as presence, written by heartbeats and read by selectors (see ``marketplace.presence``); the database
only keeps ``last_seen_at``, persisted in bulk by the ``marketplace.sweep_offline`` beat task.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone


class EnrollmentToken(models.Model):
    """A single-use secret a member creates on "Add a worker" and pastes into ``agora-worker enroll``."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="enrollment_tokens")
    name = models.CharField(max_length=100, blank=True, help_text="The worker name suggested on the page.")
    token_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)
    worker = models.OneToOneField(
        "marketplace.Worker", on_delete=models.SET_NULL, null=True, blank=True, related_name="enrollment"
    )

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(expires_at__gt=models.F("created_at")), name="mkt_enroll_expiry_after_creation"
            ),
        ]

    def __str__(self) -> str:
        return f"enrollment token #{self.pk} for {self.owner_id}"

    @property
    def is_used(self) -> bool:
        return self.used_at is not None

    def is_expired(self, now=None) -> bool:
        return (now or timezone.now()) >= self.expires_at


class Worker(models.Model):
    """A volunteer's machine running ``agora-worker``.

    ``status`` is what the owner and the admins decide (active, suspended, revoked); the live state comes
    from presence. ``reliability`` is a decaying average of valid results (see
    ``services.worker_record_outcome``): it starts at 0.5 and moves 10% of the way towards 1 for each
    valid result and towards 0 for each invalid one.
    """

    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        SUSPENDED = "suspended", "Suspended"
        REVOKED = "revoked", "Revoked"

    RELIABILITY_START = 0.5
    RELIABILITY_DECAY = 0.9

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="workers")
    name = models.CharField(max_length=100)
    gpus = models.JSONField(default=list, blank=True, help_text='List of {"name", "memory_mb"}.')
    cpu_count = models.PositiveIntegerField(default=0)
    memory_mb = models.PositiveBigIntegerField(default=0)
    torch_version = models.CharField(max_length=50, blank=True)
    cuda_version = models.CharField(max_length=50, blank=True, help_text="Empty when the machine has no CUDA.")
    benchmark_tflops = models.FloatField(default=0.0)
    benchmark_mem_gbps = models.FloatField(default=0.0)
    agent_version = models.CharField(max_length=50, blank=True)
    token_hash = models.CharField(max_length=64, unique=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    status_reason = models.TextField(blank=True, help_text="Why the worker was suspended or revoked.")
    status_changed_at = models.DateTimeField(null=True, blank=True)
    reliability = models.FloatField(default=RELIABILITY_START)
    tasks_valid = models.PositiveIntegerField(default=0)
    tasks_invalid = models.PositiveIntegerField(default=0)
    last_seen_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["status", "last_seen_at"], name="mkt_worker_status_seen")]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(status__in=["active", "suspended", "revoked"]), name="mkt_worker_status_valid"
            ),
            models.CheckConstraint(
                condition=models.Q(reliability__gte=0, reliability__lte=1), name="mkt_worker_reliability_range"
            ),
            models.CheckConstraint(
                condition=models.Q(benchmark_tflops__gte=0, benchmark_mem_gbps__gte=0),
                name="mkt_worker_benchmark_nonnegative",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} (worker:{self.pk})"

    @property
    def ledger_label(self) -> str:
        return f"worker:{self.pk}"

    @property
    def max_vram_mb(self) -> int:
        """The largest GPU memory in MB; 0 for a CPU-only worker."""
        return max((int(g.get("memory_mb") or 0) for g in self.gpus or []), default=0)

    @property
    def total_vram_mb(self) -> int:
        return sum(int(g.get("memory_mb") or 0) for g in self.gpus or [])

    @property
    def gpu_count(self) -> int:
        return len(self.gpus or [])


class CreditGrantQuerySet(models.QuerySet):
    def update(self, **kwargs):
        raise TypeError("credit grants are append-only")

    def delete(self):
        raise TypeError("credit grants are append-only")


class CreditGrant(models.Model):
    """Compute credits earned by a worker for one accepted contribution. Append-only.

    ``reference`` names what was credited (``task:17``): unique per worker, so granting twice for the same
    reference is harmless (``services.credit_grant`` returns the existing grant).
    """

    worker = models.ForeignKey(Worker, on_delete=models.PROTECT, related_name="credit_grants")
    amount = models.DecimalField(max_digits=14, decimal_places=4)
    reason = models.CharField(max_length=200)
    reference = models.CharField(max_length=100)
    created_at = models.DateTimeField(default=timezone.now)

    objects = CreditGrantQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["worker", "reference"], name="mkt_credit_unique_reference"),
            models.CheckConstraint(condition=models.Q(amount__gt=0), name="mkt_credit_amount_positive"),
        ]

    def __str__(self) -> str:
        return f"{self.amount} credits to worker:{self.worker_id} for {self.reference}"

    def save(self, *args, **kwargs):
        if not self._state.adding:
            raise TypeError("credit grants are append-only")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise TypeError("credit grants are append-only")


class WorkerOutcome(models.Model):
    """One validated (or rejected) result of a worker, recorded once per reference so that reliability
    moves exactly once per task even if the caller retries."""

    worker = models.ForeignKey(Worker, on_delete=models.CASCADE, related_name="outcomes")
    reference = models.CharField(max_length=100)
    valid = models.BooleanField()
    reliability_after = models.FloatField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["worker", "reference"], name="mkt_outcome_unique_reference"),
        ]

    def __str__(self) -> str:
        return f"worker:{self.worker_id} {self.reference} {'valid' if self.valid else 'invalid'}"
