from django.urls import path

from governance import views

app_name = "governance"
urlpatterns = [
    path("proposals/", views.proposal_list, name="proposal_list"),
    path("proposals/new/", views.proposal_create, name="proposal_create"),
    path("proposals/<int:pk>/", views.proposal_detail, name="proposal_detail"),
    path("proposals/<int:pk>/tally", views.proposal_tally, name="proposal_tally"),
    path("proposals/<int:pk>/vote", views.proposal_vote, name="proposal_vote"),
    path("proposals/<int:pk>/open", views.proposal_open, name="proposal_open"),
    path("proposals/<int:pk>/cancel", views.proposal_cancel, name="proposal_cancel"),
    path("proposals/<int:pk>/approve", views.proposal_approve, name="proposal_approve"),
    path("proposals/<int:pk>/veto", views.proposal_veto, name="proposal_veto"),
    path("proposals/<int:pk>/comment", views.proposal_comment, name="proposal_comment"),
    path("guardrails/", views.guardrail_list, name="guardrail_list"),
]
