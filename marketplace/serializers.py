"""Input shapes and output renderings of the worker API. No business rules here (those are services)."""

from __future__ import annotations

import math

from rest_framework import serializers

from core.fields import FiniteFloatField
from marketplace.models import Worker


class GpuIn(serializers.Serializer):
    name = serializers.CharField(max_length=100)
    memory_mb = serializers.IntegerField(min_value=0, max_value=10_000_000)


class HardwareIn(serializers.Serializer):
    gpus = serializers.ListField(child=GpuIn(), max_length=64, allow_empty=True)
    cpu_count = serializers.IntegerField(min_value=1, max_value=100_000)
    memory_mb = serializers.IntegerField(min_value=0, max_value=1_000_000_000)
    torch = serializers.CharField(max_length=50)
    cuda = serializers.CharField(max_length=50, allow_null=True, allow_blank=True, required=False, default=None)


class BenchmarkIn(serializers.Serializer):
    tflops = FiniteFloatField(min_value=0, max_value=1e7)
    mem_gbps = FiniteFloatField(min_value=0, max_value=1e7)


class EnrollIn(serializers.Serializer):
    enrollment_token = serializers.CharField(max_length=200)
    name = serializers.CharField(max_length=100)
    hardware = HardwareIn()
    benchmark = BenchmarkIn()
    agent_version = serializers.CharField(max_length=50)


class EnrollOut(serializers.Serializer):
    worker_id = serializers.IntegerField()
    worker_token = serializers.CharField(help_text="Shown once; the server stores only its sha256.")


# Ids are bigint columns: a larger number is refused here rather than by the database with a 500.
ID_MAX = 2**63 - 1


class HeartbeatIn(serializers.Serializer):
    state = serializers.ChoiceField(choices=["idle", "busy", "paused"])
    task_id = serializers.IntegerField(min_value=1, max_value=ID_MAX, required=False, allow_null=True, default=None)
    progress = FiniteFloatField(min_value=0, max_value=1, required=False, allow_null=True, default=None)


_HEARTBEAT_STATES = ("idle", "busy", "paused")


def heartbeat_parse(data) -> dict:
    """Validate a heartbeat body exactly as ``HeartbeatIn`` would, without building a serializer: this runs
    for every heartbeat of every agent, and field construction was the larger part of its cost. Errors are
    a DRF ``ValidationError`` keyed by field, so the response names the field like any other 400."""
    if not isinstance(data, dict):
        raise serializers.ValidationError({"non_field_errors": ["Expected a JSON object."]})
    state = data.get("state")
    if state is None:
        raise serializers.ValidationError({"state": ["This field is required."]})
    if state not in _HEARTBEAT_STATES:
        raise serializers.ValidationError({"state": [f'"{state}" is not a valid choice (idle, busy, paused).']})
    task_id = data.get("task_id")
    if task_id is not None and (isinstance(task_id, bool) or not isinstance(task_id, int)
                                or not 1 <= task_id <= ID_MAX):
        raise serializers.ValidationError({"task_id": [f"A positive integer up to {ID_MAX}, or null, is required."]})
    progress = data.get("progress")
    if progress is not None:
        if isinstance(progress, bool) or not isinstance(progress, (int, float)) or not math.isfinite(progress):
            raise serializers.ValidationError({"progress": ["A finite number between 0 and 1, or null, is required."]})
        if not 0 <= progress <= 1:
            raise serializers.ValidationError({"progress": ["Must be between 0 and 1."]})
        progress = float(progress)
    return {"state": state, "task_id": task_id, "progress": progress}


class HeartbeatOut(serializers.Serializer):
    poll_after_s = serializers.IntegerField()
    worker_state = serializers.ChoiceField(choices=["online", "busy", "paused", "offline", "suspended", "revoked"])
    server_time = serializers.DateTimeField(help_text="The server's clock (ISO 8601, UTC, milliseconds).")
    stop_task = serializers.BooleanField(help_text="True when the heartbeat's task_id is no longer wanted from "
                                                   "this worker: stop working on it.")
    stop_reason = serializers.CharField(required=False, help_text="Why, when stop_task is true.")


class SuspendIn(serializers.Serializer):
    reason = serializers.CharField(max_length=1000)


class GpuOut(serializers.Serializer):
    name = serializers.CharField()
    memory_mb = serializers.IntegerField()


class WorkerOut(serializers.ModelSerializer):
    """A worker as anyone may see it: no token digests, no owner e-mail."""

    owner = serializers.CharField(source="owner.username")
    gpus = GpuOut(many=True)
    max_vram_mb = serializers.IntegerField()
    live_state = serializers.CharField()
    credits = serializers.DecimalField(max_digits=20, decimal_places=4)
    last_seen = serializers.SerializerMethodField()

    class Meta:
        model = Worker
        fields = [
            "id", "name", "owner", "gpus", "max_vram_mb", "cpu_count", "memory_mb", "torch_version",
            "cuda_version", "benchmark_tflops", "benchmark_mem_gbps", "agent_version", "status", "live_state",
            "reliability", "tasks_valid", "tasks_invalid", "credits", "last_seen", "created_at",
        ]

    def get_last_seen(self, worker) -> str | None:
        from datetime import UTC, datetime

        value = getattr(worker, "presence", None)
        if value:
            return datetime.fromtimestamp(float(value["at"]), tz=UTC).isoformat().replace("+00:00", "Z")
        return worker.last_seen_at.isoformat().replace("+00:00", "Z") if worker.last_seen_at else None


class WorkerMeOut(WorkerOut):
    """The worker's own record, for ``agora-worker status``: adds what its last heartbeat said."""

    task_id = serializers.SerializerMethodField()
    progress = serializers.SerializerMethodField()
    status_reason = serializers.CharField()
    poll_after_s = serializers.SerializerMethodField()

    class Meta(WorkerOut.Meta):
        fields = WorkerOut.Meta.fields + ["status_reason", "task_id", "progress", "poll_after_s"]

    def get_task_id(self, worker) -> int | None:
        return (getattr(worker, "presence", None) or {}).get("task_id")

    def get_progress(self, worker) -> float | None:
        return (getattr(worker, "presence", None) or {}).get("progress")

    def get_poll_after_s(self, worker) -> int:
        from django.conf import settings

        return settings.AGORA_HEARTBEAT_INTERVAL_S
