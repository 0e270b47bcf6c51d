from django.urls import path

from governance import api

urlpatterns = [
    path("proposals/", api.ProposalListCreateApi.as_view(), name="api-proposal-list"),
    path("proposals/<int:pk>/", api.ProposalDetailApi.as_view(), name="api-proposal-detail"),
    path("proposals/<int:pk>/vote", api.ProposalVoteApi.as_view(), name="api-proposal-vote"),
    path("proposals/<int:pk>/open", api.ProposalOpenApi.as_view(), name="api-proposal-open"),
    path("proposals/<int:pk>/cancel", api.ProposalCancelApi.as_view(), name="api-proposal-cancel"),
    path("proposals/<int:pk>/approve", api.ProposalApproveApi.as_view(), name="api-proposal-approve"),
    path("proposals/<int:pk>/veto", api.ProposalVetoApi.as_view(), name="api-proposal-veto"),
    path("proposals/<int:pk>/comments", api.ProposalCommentsApi.as_view(), name="api-proposal-comments"),
    path("proposals/<int:pk>/close", api.ProposalCloseApi.as_view(), name="api-proposal-close"),
    path("guardrails/", api.GuardrailListApi.as_view(), name="api-guardrail-list"),
    path("delegations/", api.DelegationListApi.as_view(), name="api-delegation-list"),
    path("notifications/", api.NotificationListApi.as_view(), name="api-notification-list"),
    path("notifications/read", api.NotificationReadApi.as_view(), name="api-notification-read"),
    path("delegations/<str:topic>", api.DelegationRevokeApi.as_view(), name="api-delegation-revoke"),
]
