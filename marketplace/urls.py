from django.urls import path

from marketplace import views

app_name = "marketplace"
urlpatterns = [
    path("workers/", views.pool, name="pool"),
    path("workers/mine/", views.my_workers, name="my_workers"),
    path("workers/add/", views.add_worker, name="add_worker"),
    path("agent/<str:filename>", views.agent_file, name="agent_file"),
    path("workers/<int:worker_id>/", views.worker_detail, name="worker_detail"),
    path("workers/<int:worker_id>/revoke", views.worker_revoke, name="worker_revoke"),
    path("workers/<int:worker_id>/suspend", views.worker_suspend, name="worker_suspend"),
    path("workers/<int:worker_id>/reinstate", views.worker_reinstate, name="worker_reinstate"),
]
