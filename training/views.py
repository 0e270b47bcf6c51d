from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import Http404, HttpResponseForbidden
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.safestring import mark_safe
from django.views.decorators.http import require_POST
from rest_framework import serializers

from governance.models import Guardrail
from training import selectors, services
from training.charts import loss_chart_svg
from training.errors import TrainingError
from training.forms import PlaygroundForm, RunCancelForm
from training.playground import sample_generate


def run_list(request):
    status = request.GET.get("status", "")
    page = Paginator(selectors.runs_list(status=status), 25).get_page(request.GET.get("page"))
    return render(request, "training/run_list.html", {"page": page, "status": status})


def _run_context(run):
    points = selectors.run_loss_points(run)
    current = selectors.run_current_round(run)
    return {
        "run": run,
        "current": current,
        "current_tasks": list(current.tasks.all()) if current else [],
        "rounds": list(run.rounds.all()),
        "points": points,
        "chart": mark_safe(loss_chart_svg(points, title=f"Run {run.pk}: loss per round")),  # noqa: S308 (built from numbers)
        "contributors": selectors.run_contributors(run),
        "progress_pct": round(100 * sum(1 for r in run.rounds.all() if r.aggregated_at) / run.total_rounds),
    }


def run_detail(request, pk: int):
    run = selectors.run_get(pk=pk)
    context = _run_context(run)
    context["ledger_entries"] = selectors.run_ledger(run)
    if request.user.is_staff and run.is_active:
        context["cancel_form"] = RunCancelForm()
    return render(request, "training/run_detail.html", context)


@require_POST
@login_required
def run_cancel(request, pk: int):
    try:
        services.run_cancel(run_id=pk, by=request.user, reason=request.POST.get("reason", ""))
    except TrainingError as exc:
        if exc.http_status == 404:
            raise Http404(str(exc)) from exc
        if exc.http_status == 403:
            return HttpResponseForbidden(str(exc))
        messages.error(request, str(exc))
    except serializers.ValidationError as exc:
        messages.error(request, " ".join(str(m) for msgs in exc.detail.values() for m in msgs))
    else:
        messages.success(request, "Run canceled. Agents get no more work from it.")
    return redirect("training:run_detail", pk=pk)


def run_progress(request, pk: int):
    """The live part of the run page, polled by htmx while the run is active."""
    run = selectors.run_get(pk=pk)
    return render(request, "training/_run_progress.html", _run_context(run))


def model_list(request):
    return render(request, "training/model_list.html", {"models": selectors.models_list()})


def model_detail(request, slug: str):
    model = selectors.model_get(slug=slug)
    return render(request, "training/model_detail.html", {
        "model": model,
        "checkpoints": selectors.model_checkpoints(model),
        "runs": selectors.model_runs(model),
    })


def playground(request):
    models = selectors.playground_models()
    form = PlaygroundForm(request.POST or None, models=models,
                          initial={"model": request.GET.get("model") or (models[0].slug if models else None)})
    sample = guardrail = None
    if request.method == "POST" and request.user.is_authenticated and form.is_valid():
        model = next(m for m in models if m.slug == form.cleaned_data["model"])
        sample = sample_generate(model=model, prompt=form.cleaned_data["prompt"],
                                 max_new_tokens=form.cleaned_data["max_new_tokens"],
                                 temperature=form.cleaned_data["temperature"], seed=form.cleaned_data["seed"])
        if sample.blocked_by:
            guardrail = Guardrail.objects.select_related("proposal").filter(pk=sample.blocked_by["id"]).first()
    context = {"form": form, "models": models, "sample": sample, "guardrail": guardrail,
               "login_url": reverse("login") + "?next=" + reverse("training:playground")}
    template = "training/_playground_result.html" if request.htmx and sample else "training/playground.html"
    return render(request, template, context)
