from django.urls import path
from django.views.generic import TemplateView

app_name = "marketplace"
_soon = TemplateView.as_view(template_name="agora/soon.html")
urlpatterns = [
    path("workers/", _soon, name="pool"),
    path("workers/mine/", _soon, name="my_workers"),
    path("workers/add/", _soon, name="add_worker"),
]
