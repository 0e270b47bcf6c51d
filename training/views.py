import json

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import Http404, HttpResponseForbidden, JsonResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.safestring import mark_safe
from django.views.decorators.http import require_POST
from rest_framework import serializers

from governance.models import Guardrail
from training import dashboard, export, selectors, services
from training.charts import loss_chart_svg
from training.errors import ModelImportError, TrainingError
from training.forms import ModelImportForm, PlaygroundForm, RunCancelForm
from training.playground import sample_events, sample_generate


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
    context["ledger_page"] = dashboard.run_ledger_page(run, request.GET.get("ledger_page"))
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
        "versions": selectors.model_versions(model),
        "checkpoints": selectors.model_checkpoints(model),
        "runs": selectors.model_runs(model),
    })


def version_export(request, slug: str, number: int):
    """A version as a Hugging Face directory in a .tar.gz, streamed. Public: the weights, the data sources
    and the ledger behind them already are, and anyone may check a model card against the ledger."""
    version = selectors.version_for_export(slug=slug, number=number)
    directory = export.export_directory(version)
    name = export.export_name(version)
    response = StreamingHttpResponse(export.tar_gz_stream(directory, name), content_type="application/gzip")
    response["Content-Disposition"] = f'attachment; filename="{name}.tar.gz"'
    response["Cache-Control"] = "public, max-age=31536000, immutable"  # a version never changes
    return response


def _playground_form(request, data=None):
    models = selectors.playground_models()
    slug = (data or {}).get("model") or request.GET.get("model") or (models[0].slug if models else None)
    model = next((m for m in models if m.slug == slug), models[0] if models else None)
    versions = selectors.model_versions(model) if model else []
    initial = {"model": model.slug if model else None, "version": request.GET.get("version") or ""}
    return PlaygroundForm(data, models=models, versions=versions, initial=initial), models, model, versions


def _sampling_args(form, model) -> dict | None:
    """The sampler's arguments from a valid form, or None (with a form error) when the version is gone."""
    data = form.cleaned_data
    version = selectors.version_get(model=model, number=data["version"])
    if version is None:
        form.add_error("version", "This model has no such version.")
        return None
    top_p = data["top_p"]
    return {"version": version, "prompt": data["prompt"], "max_new_tokens": data["max_new_tokens"],
            "temperature": data["temperature"], "top_k": data["top_k"],
            "top_p": None if top_p is None or top_p >= 1.0 else top_p, "seed": data["seed"]}


def playground(request):
    form, models, model, versions = _playground_form(request, request.POST or None)
    sample = guardrail = None
    if request.method == "POST" and request.user.is_authenticated and form.is_valid():
        args = _sampling_args(form, model)
        if args is not None:
            sample = sample_generate(**args)
            if sample.blocked_by:
                guardrail = Guardrail.objects.select_related("proposal").filter(pk=sample.blocked_by["id"]).first()
    context = {"form": form, "models": models, "model": model, "versions": versions, "sample": sample,
               "guardrail": guardrail,
               "login_url": reverse("login") + "?next=" + reverse("training:playground")}
    template = "training/_playground_result.html" if request.htmx and sample else "training/playground.html"
    return render(request, template, context)


@require_POST
def playground_stream(request):
    """The sample as newline-delimited JSON events, each sent as soon as it passes the output guardrails
    (``training.playground.sample_events``); the page's script shows the text as it arrives."""
    if not request.user.is_authenticated:
        return JsonResponse({"error": "not_authenticated", "detail": "Log in to generate text."}, status=401)
    form, _, model, _ = _playground_form(request, request.POST)
    args = _sampling_args(form, model) if form.is_valid() else None
    if args is None:
        fields = {name: [str(m) for m in messages] for name, messages in form.errors.items()}
        detail = "; ".join(f"{name}: {' '.join(m)}" for name, m in fields.items())
        return JsonResponse({"error": "invalid", "detail": detail, "fields": fields}, status=400)

    def lines():
        for event in sample_events(**args):
            if event["event"] == "withheld" and event.get("guardrail"):
                g = Guardrail.objects.select_related("proposal").filter(pk=event["guardrail"]["id"]).first()
                event = {**event, "url": g.get_absolute_url() if g else "",
                         "proposal_url": g.proposal.get_absolute_url() if g and g.proposal_id else ""}
            yield json.dumps(event) + "\n"

    response = StreamingHttpResponse(lines(), content_type="application/x-ndjson")
    response["Cache-Control"] = "no-store"
    response["X-Accel-Buffering"] = "no"  # let a proxy pass each line on at once
    return response


@login_required
def model_import(request):
    """Staff: import a Hugging Face model directory from under the data root as a model version."""
    if not request.user.is_staff:
        return HttpResponseForbidden("Only staff can import models.")
    form = ModelImportForm(request.POST or None, data_root=settings.AGORA_DATA_ROOT)
    if request.method == "POST" and form.is_valid():
        try:
            version = services.model_import(directory=form.cleaned_data["directory"], slug=form.cleaned_data["slug"],
                                            name=form.cleaned_data["name"], by=request.user)
        except ModelImportError as exc:
            form.add_error(exc.field if exc.field in form.fields else None, str(exc))
        else:
            messages.success(request, f"Imported {version.model.slug} v{version.number}.")
            return redirect("training:model_detail", slug=version.model.slug)
    return render(request, "training/model_import.html", {"form": form, "data_root": settings.AGORA_DATA_ROOT})
