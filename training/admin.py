from django.contrib import admin

from core.admin import ReadOnlyAdmin
from training.models import Checkpoint, CommunityModel, Round, Task, TrainingRun

# Read-mostly: state changes go through services (and the ledger), never through admin forms.


@admin.register(CommunityModel)
class CommunityModelAdmin(ReadOnlyAdmin):
    list_display = ["slug", "name", "arch", "current_checkpoint", "created_at"]
    readonly_fields = ["slug", "arch", "config", "current_checkpoint", "created_at"]
    search_fields = ["slug", "name"]


@admin.register(Checkpoint)
class CheckpointAdmin(ReadOnlyAdmin):
    list_display = ["sha256", "model", "run", "size", "eval_loss", "created_at"]
    list_select_related = ["model", "run"]


@admin.register(TrainingRun)
class TrainingRunAdmin(ReadOnlyAdmin):
    list_display = ["id", "model", "proposal", "status", "current_round", "total_rounds", "created_at"]
    list_filter = ["status"]
    list_select_related = ["model", "proposal"]


@admin.register(Round)
class RoundAdmin(ReadOnlyAdmin):
    list_display = ["run", "index", "status", "accepted", "eval_loss_before", "eval_loss_after", "aggregated_at"]
    list_filter = ["status"]


@admin.register(Task)
class TaskAdmin(ReadOnlyAdmin):
    list_display = ["id", "round", "shard_index", "worker", "status", "deadline", "reason"]
    list_filter = ["status"]
    list_select_related = ["round", "worker"]
