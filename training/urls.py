from django.urls import path

from training import dashboard_views, views

app_name = "training"
urlpatterns = [
    path("runs/", views.run_list, name="run_list"),
    path("runs/<int:pk>/", views.run_detail, name="run_detail"),
    path("runs/<int:pk>/progress", views.run_progress, name="run_progress"),
    path("runs/<int:pk>/samples/<int:index>", dashboard_views.round_sample, name="round_sample"),
    path("runs/<int:pk>/ledger", dashboard_views.run_ledger, name="run_ledger"),
    path("runs/compare/", dashboard_views.runs_compare, name="runs_compare"),
    path("runs/<int:pk>/cancel", views.run_cancel, name="run_cancel"),
    path("models/", views.model_list, name="model_list"),
    path("models/import", views.model_import, name="model_import"),
    path("models/<slug:slug>/", views.model_detail, name="model_detail"),
    path("models/<slug:slug>/v<int:number>.tar.gz", views.version_export, name="version_export"),
    path("playground/", views.playground, name="playground"),
    path("playground/stream", views.playground_stream, name="playground_stream"),
]
