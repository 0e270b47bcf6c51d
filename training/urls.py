from django.urls import path
from django.views.generic import TemplateView

app_name = "training"
_soon = TemplateView.as_view(template_name="agora/soon.html")
urlpatterns = [
    path("runs/", _soon, name="run_list"),
    path("models/", _soon, name="model_list"),
    path("playground/", _soon, name="playground"),
]
