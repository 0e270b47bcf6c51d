"""Server-rendered governance pages. Thin: forms validate shape, services do the work, selectors read."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import Http404, HttpResponseForbidden
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST
from rest_framework import serializers

from core.client_ip import client_rate_key
from core.ratelimit import rate_limited, signed_in_account
from governance import selectors, services
from governance.eligibility import proposal_voter_eligibility
from governance.errors import GovernanceError
from governance.forms import (
    CloseEarlyForm,
    CommentForm,
    DelegationForm,
    GuardrailProposalForm,
    TrainingProposalForm,
    VetoForm,
    initial_from,
    setting_text,
)
from governance.models import Guardrail, Notification, Proposal, Vote
from governance.notifications import notifications_mark_read, preferences_for, preferences_set
from ledger.selectors import entries_for_subjects

PAGE_SIZE = 20


def _get_proposal(request, pk: int) -> Proposal:
    try:
        return selectors.proposal_get(pk=pk, user=request.user)
    except Proposal.DoesNotExist:
        raise Http404("No such proposal.") from None


@require_GET
def proposal_list(request):
    kind = request.GET.get("kind", "")
    status = request.GET.get("status", "")
    q = request.GET.get("q", "").strip()[:200]
    kind = kind if kind in Proposal.Kind.values else ""
    status = status if status in Proposal.Status.values else ""
    qs = selectors.proposals_list(kind=kind, status=status, q=q, user=request.user)
    page = Paginator(qs, PAGE_SIZE).get_page(request.GET.get("page"))
    rows = [(proposal, selectors.annotated_tally(proposal)) for proposal in page.object_list]
    return render(
        request,
        "governance/proposal_list.html",
        {
            "page": page,
            "rows": rows,
            "kind": kind,
            "status": status,
            "q": q,
            "kinds": Proposal.Kind.choices,
            "statuses": Proposal.Status.choices,
        },
    )


def _vote_panel_context(request, proposal: Proposal, *, error: str = "") -> dict:
    tally = selectors.proposal_tally(proposal=proposal)
    mine = selectors.my_vote(proposal=proposal, user=request.user)
    eligibility = (
        proposal_voter_eligibility(proposal=proposal, user=request.user)
        if proposal.status == Proposal.Status.ACTIVE and request.user.is_authenticated
        else None
    )
    return {"proposal": proposal, "tally": tally, "my_vote": mine, "vote_error": error,
            "choices": Vote.Choice.choices, "eligibility": eligibility}


def _live_parts(proposal: Proposal) -> dict:
    """What changes when someone votes: the votes list and the proposal's ledger entries."""
    return {
        "votes": list(selectors.proposal_votes(proposal=proposal)),
        "entries": entries_for_subjects(subjects=[proposal.ledger_subject], limit=50),
    }


def proposal_detail(request, pk: int):
    proposal = _get_proposal(request, pk)
    context = _vote_panel_context(request, proposal)
    context.update(
        _live_parts(proposal),
        comments=selectors.comment_thread(proposal=proposal),
        comment_form=CommentForm(),
        veto_form=VetoForm(),
        close_form=CloseEarlyForm(),
        revisions=selectors.proposal_revisions(proposal=proposal),
        delegation=selectors.delegation_in_force(user=request.user, kind=proposal.kind),
        retire_target=(
            Guardrail.objects.filter(pk=proposal.spec.get("guardrail_id")).first()
            if proposal.kind == Proposal.Kind.GUARDRAIL and proposal.spec.get("action") == "retire"
            else None
        ),
        adopted=list(proposal.adopted_guardrails.all()) if proposal.kind == Proposal.Kind.GUARDRAIL else [],
    )
    return render(request, "governance/proposal_detail.html", context)


@require_GET
def proposal_tally(request, pk: int):
    """The vote panel alone, for htmx polling while the vote is open."""
    proposal = _get_proposal(request, pk)
    return render(request, "governance/_vote_panel.html", _vote_panel_context(request, proposal))


@require_POST
def proposal_vote(request, pk: int):
    proposal = _get_proposal(request, pk)
    error = ""
    if not request.user.is_authenticated:
        if not request.htmx:
            return redirect(f"{reverse('login')}?next={proposal.get_absolute_url()}")
        error = "Log in to vote."
    else:
        try:
            services.vote_cast(proposal=proposal, voter=request.user, choice=request.POST.get("choice", ""))
        except (GovernanceError, serializers.ValidationError) as exc:
            error = _message(exc)
    if request.htmx:
        # The panel, and out of band the votes list, the ledger entries and the status badge, so
        # nothing on the page is stale after a vote (or the early close it may have caused).
        proposal = _get_proposal(request, pk)
        context = _vote_panel_context(request, proposal, error=error)
        context.update(_live_parts(proposal), oob=True)
        return render(request, "governance/_vote_response.html", context)
    if error:
        messages.error(request, error)
    else:
        messages.success(request, "Your vote is recorded.")
    return redirect(proposal)


def _message(exc: Exception) -> str:
    if isinstance(exc, serializers.ValidationError):
        detail = exc.detail
        if isinstance(detail, dict):
            return "; ".join(str(m) for msgs in detail.values() for m in (msgs if isinstance(msgs, list) else [msgs]))
        return "; ".join(str(m) for m in detail)
    return str(exc)


def _act(request, pk: int, action, success: str):
    proposal = _get_proposal(request, pk)
    try:
        action(proposal)
    except GovernanceError as exc:
        if getattr(exc, "http_status", 409) == 403:
            return HttpResponseForbidden(str(exc))
        messages.error(request, str(exc))
    except serializers.ValidationError as exc:
        messages.error(request, _message(exc))
    else:
        messages.success(request, success)
    return redirect(proposal)


@require_POST
@login_required
def proposal_open(request, pk: int):
    return _act(request, pk, lambda p: services.proposal_open(proposal=p, by=request.user), "The vote is open.")


@require_POST
@login_required
def proposal_cancel(request, pk: int):
    return _act(request, pk, lambda p: services.proposal_cancel(proposal=p, by=request.user), "Proposal canceled.")


@require_POST
@login_required
def proposal_approve(request, pk: int):
    if not request.user.is_staff:
        return HttpResponseForbidden("Only staff can approve.")
    return _act(
        request, pk, lambda p: services.proposal_approve(proposal=p, by=request.user),
        "Approved. The training run will be created shortly.",
    )


@require_POST
@login_required
def proposal_veto(request, pk: int):
    if not request.user.is_staff:
        return HttpResponseForbidden("Only staff can veto.")
    form = VetoForm(request.POST)
    reason = form.data.get("reason", "")
    return _act(request, pk, lambda p: services.proposal_veto(proposal=p, by=request.user, reason=reason), "Vetoed.")


@require_POST
@login_required
@rate_limited(("comment_address", client_rate_key, "address"), ("comment_account", signed_in_account, "account"))
def proposal_comment(request, pk: int):
    form = CommentForm(request.POST)
    body = form.data.get("body", "")
    parent = request.POST.get("parent") or None
    return _act(
        request, pk,
        lambda p: services.comment_post(proposal=p, author=request.user, body=body, parent_id=parent),
        "Comment posted.",
    )


@require_POST
@login_required
def proposal_close_early(request, pk: int):
    if not request.user.is_staff:
        return HttpResponseForbidden("Only staff can close a vote early.")
    reason = CloseEarlyForm(request.POST).data.get("reason", "")
    return _act(
        request, pk, lambda p: services.proposal_close_early(proposal=p, by=request.user, reason=reason),
        "The vote is closed.",
    )


@login_required
def proposal_edit(request, pk: int):
    """The author rewrites a draft; each save is kept as a revision."""
    proposal = _get_proposal(request, pk)
    if proposal.author_id != request.user.pk:
        return HttpResponseForbidden("Only the author can edit a proposal.")
    if proposal.status != Proposal.Status.DRAFT:
        messages.error(request, "Only a draft can be edited; once the vote opens the text is final.")
        return redirect(proposal)
    guardrails = list(Guardrail.objects.filter(active=True).order_by("id"))
    initial = initial_from(proposal)
    if proposal.kind == Proposal.Kind.TRAINING:
        form = TrainingProposalForm(request.POST or None, initial=initial, draft_spec=proposal.spec)
    else:
        form = GuardrailProposalForm(request.POST or None, guardrails=guardrails, initial=initial)
    if request.method == "POST" and form.is_valid():
        try:
            services.proposal_edit(
                proposal=proposal, by=request.user, title=form.cleaned_data["title"],
                body=form.cleaned_data["body"], spec=form.spec(), voting_hours=form.cleaned_data.get("voting_hours"),
            )
            dropped = getattr(form, "dropped", None)
            if dropped:
                messages.warning(request, f"Not carried over to {proposal.spec['model']['arch']}, which does not "
                                 "read them: " + "; ".join(setting_text(p, v) for p, v in dropped.items())
                                 + ". The previous revision still has them.")
            if form.cleaned_data["open_now"]:
                services.proposal_open(proposal=proposal, by=request.user)
        except serializers.ValidationError as exc:
            form.add_spec_errors(exc.detail if isinstance(exc.detail, dict) else {"non_field_errors": exc.detail})
        except GovernanceError as exc:
            messages.error(request, str(exc))
            return redirect(proposal)
        else:
            messages.success(request, "Draft saved." if proposal.status == Proposal.Status.DRAFT else "Saved; the vote is open.")
            return redirect(proposal)
    return render(
        request, "governance/proposal_form.html",
        {"form": form, "kind": proposal.kind, "kinds": Proposal.Kind.choices, "editing": proposal},
        status=400 if request.method == "POST" else 200,
    )


@require_GET
def proposal_history(request, pk: int):
    """Every saved text of the proposal, each with a unified diff against the one before."""
    import difflib
    import json

    proposal = _get_proposal(request, pk)
    revisions = selectors.proposal_revisions(proposal=proposal)

    def text(revision) -> list[str]:
        spec = json.dumps(revision.spec, sort_keys=True, indent=2, ensure_ascii=False)
        return f"# {revision.title}\n\n{revision.body}\n\n--- spec ---\n{spec}\n".splitlines(keepends=True)

    rows = []
    for previous, revision in zip([None, *revisions], revisions, strict=False):
        diff = "" if previous is None else "".join(difflib.unified_diff(
            text(previous), text(revision), f"revision {previous.number}", f"revision {revision.number}"))
        rows.append((revision, diff))
    return render(request, "governance/proposal_history.html", {"proposal": proposal, "rows": rows})


@login_required
def delegations(request):
    """Delegate your vote (overall or per kind), revoke it, and see who delegates to you."""
    form = DelegationForm(request.POST or None)
    if request.method == "POST":
        action = request.POST.get("action", "set")
        try:
            if action == "revoke":
                kind = request.POST.get("kind", "")
                if services.delegation_revoke(delegator=request.user, kind=kind):
                    messages.success(request, "Delegation revoked; you vote yourself again.")
                return redirect("governance:delegations")
            if form.is_valid():
                from django.contrib.auth import get_user_model

                delegate = get_user_model().objects.filter(username=form.cleaned_data["delegate"], is_active=True).first()
                delegation = services.delegation_set(
                    delegator=request.user, delegate=delegate, kind=form.cleaned_data["kind"] or ""
                )
                messages.success(request, f"{delegation.delegate.username} now votes for you on {delegation.topic.lower()}.")
                return redirect("governance:delegations")
        except serializers.ValidationError as exc:
            detail = exc.detail if isinstance(exc.detail, dict) else {"delegate": exc.detail}
            for field, errors in detail.items():
                for error in errors if isinstance(errors, list) else [errors]:
                    form.add_error(field if field in form.fields else None, str(error))
        except GovernanceError as exc:
            form.add_error(None, str(exc))
    context = {"form": form, **selectors.delegations_of(user=request.user)}
    return render(request, "governance/delegations.html", context, status=400 if form.errors else 200)


@login_required
def notifications(request):
    if request.method == "POST":
        ids = [int(i) for i in request.POST.getlist("id") if i.isdigit()]
        notifications_mark_read(user=request.user, ids=ids or None)
        return redirect("governance:notifications")
    page = Paginator(selectors.notifications_for(user=request.user), 30).get_page(request.GET.get("page"))
    return render(request, "governance/notifications.html", {"page": page})


@require_POST
@login_required
def notification_open(request, pk: int):
    """Mark one notification read and go where it points."""
    notification = Notification.objects.filter(pk=pk, user=request.user).first()
    if notification is None:
        raise Http404("No such notification.")
    notifications_mark_read(user=request.user, ids=[notification.pk])
    url = notification.url if notification.url.startswith("/") and not notification.url.startswith("//") else "/"
    return redirect(url)


@login_required
def notification_settings(request):
    kinds = Notification.Kind.choices
    if request.method == "POST":
        choices = {
            kind: {"in_app": f"{kind}:in_app" in request.POST, "email": f"{kind}:email" in request.POST}
            for kind, _ in kinds
        }
        preferences_set(user=request.user, choices=choices)
        messages.success(request, "Your notification choices are saved.")
        return redirect("governance:notification_settings")
    prefs = preferences_for(user=request.user)
    rows = [(kind, label, prefs[kind]) for kind, label in kinds]
    return render(request, "governance/notification_settings.html", {"rows": rows})


@login_required
def proposal_create(request):
    kind = request.POST.get("kind") or request.GET.get("kind") or Proposal.Kind.TRAINING
    if kind not in Proposal.Kind.values:
        kind = Proposal.Kind.TRAINING
    guardrails = list(Guardrail.objects.filter(active=True).order_by("id"))
    if kind == Proposal.Kind.TRAINING:
        form = TrainingProposalForm(request.POST or None)
    else:
        initial = {}
        retire = request.GET.get("retire")
        if retire and retire.isdigit():
            target = next((g for g in guardrails if g.pk == int(retire)), None)
            if target is not None:
                initial = {
                    "action": "retire",
                    "guardrail_id": target.pk,
                    "title": f"Retire guardrail #{target.pk}: {target.title}"[:200],
                    "description": f"Retire “{target.title}”.",
                }
        form = GuardrailProposalForm(request.POST or None, guardrails=guardrails, initial=initial)
    if request.method == "POST" and form.is_valid():
        try:
            proposal = services.proposal_submit(
                author=request.user,
                kind=kind,
                title=form.cleaned_data["title"],
                body=form.cleaned_data["body"],
                spec=form.spec(),
                open_now=form.cleaned_data["open_now"],
                voting_hours=form.cleaned_data.get("voting_hours"),
            )
        except serializers.ValidationError as exc:
            form.add_spec_errors(exc.detail if isinstance(exc.detail, dict) else {"non_field_errors": exc.detail})
        else:
            opened = proposal.status == Proposal.Status.ACTIVE
            messages.success(request, "Proposal submitted; the vote is open." if opened else "Draft saved.")
            return redirect(proposal)
    if request.method == "POST":
        status = 400
    else:
        status = 200
    return render(
        request, "governance/proposal_form.html", {"form": form, "kind": kind, "kinds": Proposal.Kind.choices},
        status=status,
    )


@require_GET
def guardrail_list(request):
    context = selectors.guardrails_for_page()
    context["pending"] = selectors.guardrail_retire_pending(guardrail_ids=[g.pk for g in context["active"]])
    return render(request, "governance/guardrail_list.html", context)
