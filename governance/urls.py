from django.urls import path
from django.views.generic import TemplateView

app_name = "governance"
_soon = TemplateView.as_view(template_name="agora/soon.html")
urlpatterns = [
    path("proposals/", _soon, name="proposal_list"),
    path("proposals/new/", _soon, name="proposal_create"),
    path("proposals/<int:pk>/", _soon, name="proposal_detail"),
    path("guardrails/", _soon, name="guardrail_list"),
]
