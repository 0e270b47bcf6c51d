from django.urls import path

from ledger import api

urlpatterns = [
    path("ledger/", api.LedgerListApi.as_view(), name="api-ledger"),
    path("ledger/head", api.LedgerHeadApi.as_view(), name="api-ledger-head"),
]
