from django.urls import path

from governance import feeds, views

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
    path("proposals/<int:pk>/close", views.proposal_close_early, name="proposal_close_early"),
    path("proposals/<int:pk>/edit", views.proposal_edit, name="proposal_edit"),
    path("proposals/<int:pk>/history", views.proposal_history, name="proposal_history"),
    path("guardrails/", views.guardrail_list, name="guardrail_list"),
    path("delegations/", views.delegations, name="delegations"),
    path("notifications/", views.notifications, name="notifications"),
    path("notifications/<int:pk>/open", views.notification_open, name="notification_open"),
    path("notifications/settings/", views.notification_settings, name="notification_settings"),
    path("feeds/proposals.atom", feeds.ProposalsFeed(), name="feed_proposals"),
    path("feeds/ledger.atom", feeds.LedgerFeed(), name="feed_ledger"),
]
