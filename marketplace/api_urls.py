from django.urls import path

from marketplace import api

urlpatterns = [
    path("workers/", api.WorkerListApi.as_view(), name="api-workers"),
    path("workers/enroll", api.EnrollApi.as_view(), name="api-worker-enroll"),
    path("workers/heartbeat", api.HeartbeatApi.as_view(), name="api-worker-heartbeat"),
    path("workers/me", api.WorkerMeApi.as_view(), name="api-worker-me"),
    path("workers/<int:worker_id>/", api.WorkerDetailApi.as_view(), name="api-worker-detail"),
    path("workers/<int:worker_id>/suspend", api.WorkerSuspendApi.as_view(), name="api-worker-suspend"),
    path("workers/<int:worker_id>/reinstate", api.WorkerReinstateApi.as_view(), name="api-worker-reinstate"),
    path("workers/<int:worker_id>/revoke", api.WorkerRevokeApi.as_view(), name="api-worker-revoke"),
]
