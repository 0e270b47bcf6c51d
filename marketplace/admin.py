"""Django admin for the worker registry. Status changes go through the services (ledger entries included);
tokens, credits and statuses are never edited by hand here."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.shortcuts import render

from core.admin import ReadOnlyAdmin
from marketplace import services
from marketplace.errors import MarketplaceError
from marketplace.models import CreditGrant, EnrollmentToken, Worker, WorkerOutcome


class _SuspendForm(forms.Form):
    reason = forms.CharField(max_length=1000, widget=forms.Textarea(attrs={"rows": 3}))


def _run(modeladmin, request, queryset, action, **kwargs):
    done = 0
    for worker in queryset:
        try:
            action(worker=worker, by=request.user, **kwargs)
            done += 1
        except MarketplaceError as exc:
            modeladmin.message_user(request, f"{worker}: {exc}", messages.WARNING)
    if done:
        modeladmin.message_user(request, f"{done} worker(s) updated.", messages.SUCCESS)


@admin.action(description="Suspend selected workers (asks for a reason)")
def suspend_workers(modeladmin, request, queryset):
    if "apply" in request.POST:
        form = _SuspendForm(request.POST)
        if form.is_valid():
            _run(modeladmin, request, queryset, services.worker_suspend, reason=form.cleaned_data["reason"])
            return None
    else:
        form = _SuspendForm()
    return render(request, "marketplace/admin_suspend.html", {
        **modeladmin.admin_site.each_context(request),
        "title": "Suspend workers",
        "workers": queryset,
        "form": form,
        "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
        "opts": modeladmin.model._meta,
    })


@admin.action(description="Reinstate selected workers")
def reinstate_workers(modeladmin, request, queryset):
    _run(modeladmin, request, queryset, services.worker_reinstate)


@admin.register(Worker)
class WorkerAdmin(ReadOnlyAdmin):
    list_display = ["id", "name", "owner", "status", "reliability", "benchmark_tflops", "agent_version",
                    "last_seen_at", "created_at"]
    list_filter = ["status"]
    search_fields = ["name", "owner__username"]
    list_select_related = ["owner"]
    actions = [suspend_workers, reinstate_workers]
    exclude = ["token_hash"]
    readonly_fields = [f.name for f in Worker._meta.concrete_fields if f.name != "token_hash"]


@admin.register(CreditGrant)
class CreditGrantAdmin(ReadOnlyAdmin):
    list_display = ["id", "worker", "amount", "reason", "reference", "created_at"]
    list_select_related = ["worker"]
    search_fields = ["reference", "worker__name"]


@admin.register(EnrollmentToken)
class EnrollmentTokenAdmin(ReadOnlyAdmin):
    list_display = ["id", "owner", "name", "created_at", "expires_at", "used_at", "worker"]
    list_select_related = ["owner", "worker"]
    exclude = ["token_hash"]


@admin.register(WorkerOutcome)
class WorkerOutcomeAdmin(ReadOnlyAdmin):
    list_display = ["id", "worker", "reference", "valid", "reliability_after", "created_at"]
    list_select_related = ["worker"]
