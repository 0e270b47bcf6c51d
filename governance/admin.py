"""Django admin: read-mostly. State changes go through the services (approve/veto actions)."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.shortcuts import render

from governance import services
from governance.errors import GovernanceError
from governance.models import (
    Comment,
    Delegation,
    Guardrail,
    Notification,
    Proposal,
    ProposalRevision,
    Vote,
    VoterApproval,
)
from governance.selectors import number


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def get_readonly_fields(self, request, obj=None):
        return [field.name for field in self.model._meta.fields]


class VoteInline(admin.TabularInline):
    model = Vote
    extra = 0
    can_delete = False
    readonly_fields = ["voter", "via", "choice", "weight", "created_at", "updated_at"]

    def has_add_permission(self, request, obj=None):
        return False


class VetoReasonForm(forms.Form):
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 4, "cols": 60}), max_length=2000)


@admin.register(Proposal)
class ProposalAdmin(ReadOnlyAdmin):
    list_display = ["id", "title", "kind", "status", "author", "created_at", "closes_at"]
    list_filter = ["kind", "status"]
    search_fields = ["title", "body", "content_hash"]
    list_select_related = ["author"]
    inlines = [VoteInline]
    actions = ["approve_selected", "veto_selected"]

    @admin.action(description="Approve selected succeeded training proposals")
    def approve_selected(self, request, queryset):
        done = 0
        for proposal in queryset:
            try:
                services.proposal_approve(proposal=proposal, by=request.user)
            except GovernanceError as exc:
                self.message_user(request, f"#{proposal.pk}: {exc}", messages.ERROR)
            else:
                done += 1
        if done:
            self.message_user(request, f"Approved {done} proposal(s).", messages.SUCCESS)

    @admin.action(description="Veto selected succeeded training proposals (asks for a reason)")
    def veto_selected(self, request, queryset):
        form = VetoReasonForm(request.POST if "apply" in request.POST else None)
        if form.is_valid():
            done = 0
            for proposal in queryset:
                try:
                    services.proposal_veto(proposal=proposal, by=request.user, reason=form.cleaned_data["reason"])
                except GovernanceError as exc:
                    self.message_user(request, f"#{proposal.pk}: {exc}", messages.ERROR)
                else:
                    done += 1
            if done:
                self.message_user(request, f"Vetoed {done} proposal(s).", messages.SUCCESS)
            return None
        return render(
            request,
            "governance/admin_veto.html",
            {
                **self.admin_site.each_context(request),
                "title": "Veto proposals",
                "proposals": queryset,
                "form": form,
                "opts": self.model._meta,
                "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
            },
        )


@admin.register(Vote)
class VoteAdmin(ReadOnlyAdmin):
    list_display = ["proposal", "voter", "choice", "weight_display", "updated_at"]
    list_filter = ["choice"]
    list_select_related = ["proposal", "voter"]

    @admin.display(description="weight")
    def weight_display(self, obj):
        return number(obj.weight)


@admin.register(Comment)
class CommentAdmin(ReadOnlyAdmin):
    list_display = ["proposal", "author", "created_at"]
    list_select_related = ["proposal", "author"]
    search_fields = ["body"]


@admin.register(Guardrail)
class GuardrailAdmin(ReadOnlyAdmin):
    list_display = ["id", "title", "kind", "active", "enacted_at", "retired_at"]
    list_filter = ["kind", "active"]


@admin.register(VoterApproval)
class VoterApprovalAdmin(admin.ModelAdmin):
    """Staff-approved membership (the ``staff_approved`` voter eligibility term): add to approve, delete to
    withdraw. Both go through the services, so each lands in the ledger."""

    list_display = ["user", "approved_by", "approved_at", "note"]
    list_select_related = ["user", "approved_by"]
    search_fields = ["user__username", "user__email"]
    raw_id_fields = ["user"]
    fields = ["user", "note"]
    actions = ["revoke_selected"]

    def get_readonly_fields(self, request, obj=None):
        return ["user", "note"] if obj is not None else []

    def get_actions(self, request):
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        return actions

    def save_model(self, request, obj, form, change):
        approval = services.voter_approval_grant(user=obj.user, by=request.user, note=obj.note)
        obj.pk, obj.approved_by, obj.approved_at = approval.pk, approval.approved_by, approval.approved_at

    def delete_model(self, request, obj):
        services.voter_approval_revoke(user=obj.user, by=request.user)

    @admin.action(description="Withdraw approval of the selected members")
    def revoke_selected(self, request, queryset):
        done = sum(services.voter_approval_revoke(user=a.user, by=request.user) for a in queryset)
        self.message_user(request, f"Withdrew {done} approval(s).", messages.SUCCESS)


@admin.register(Delegation)
class DelegationAdmin(ReadOnlyAdmin):
    """Members set and revoke delegations themselves (ledger entries); the admin only shows them."""

    list_display = ["delegator", "delegate", "kind", "created_at"]
    list_filter = ["kind"]
    search_fields = ["delegator__username", "delegate__username"]


@admin.register(ProposalRevision)
class ProposalRevisionAdmin(ReadOnlyAdmin):
    list_display = ["proposal", "number", "title", "content_hash", "created_at"]
    search_fields = ["title", "content_hash"]


@admin.register(Notification)
class NotificationAdmin(ReadOnlyAdmin):
    list_display = ["user", "kind", "text", "created_at", "read_at"]
    list_filter = ["kind"]
    search_fields = ["user__username", "text"]
