from django.urls import path

from training import api

urlpatterns = [
    path("tasks/claim", api.TaskClaimApi.as_view(), name="api-task-claim"),
    path("tasks/<int:task_id>/result", api.TaskResultApi.as_view(), name="api-task-result"),
    path("tasks/<int:task_id>/fail", api.TaskFailApi.as_view(), name="api-task-fail"),
    path("checkpoints/<str:sha256>", api.checkpoint_download, name="api-checkpoint"),
    path("checkpoints/<str:sha256>/delta", api.checkpoint_delta_download, name="api-checkpoint-delta"),
    path("tokenizers/<str:sha256>", api.TokenizerDownloadApi.as_view(), name="api-tokenizer"),
    path("shards/<str:sha256>", api.ShardDownloadApi.as_view(), name="api-shard"),
    path("runs/", api.RunListApi.as_view(), name="api-run-list"),
    path("runs/<int:pk>/", api.RunDetailApi.as_view(), name="api-run-detail"),
    path("runs/<int:pk>/cancel", api.RunCancelApi.as_view(), name="api-run-cancel"),
]
