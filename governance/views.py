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
from governance.forms import CommentForm, GuardrailProposalForm, TrainingProposalForm, VetoForm
from governance.models import Guardrail, Proposal, Vote
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


def proposal_detail(request, pk: int):
    proposal = _get_proposal(request, pk)
    context = _vote_panel_context(request, proposal)
    context.update(
        votes=list(selectors.proposal_votes(proposal=proposal)),
        comments=list(selectors.proposal_comments(proposal=proposal)),
        comment_form=CommentForm(),
        veto_form=VetoForm(),
        entries=entries_for_subjects(subjects=[proposal.ledger_subject], limit=50),
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
        proposal.refresh_from_db()
        return render(request, "governance/_vote_panel.html", _vote_panel_context(request, proposal, error=error))
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
    return _act(
        request, pk, lambda p: services.comment_post(proposal=p, author=request.user, body=body), "Comment posted."
    )


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
