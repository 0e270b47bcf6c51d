"""Pages of the run dashboard: a round's sample (loaded lazily), the run's ledger a page at a time, and
runs compared side by side."""

from __future__ import annotations

import re

from django.shortcuts import render
from django.utils.safestring import mark_safe

from training import dashboard, selectors
from training.charts import loss_tokens_chart_svg

MAX_COMPARED = 6


def round_sample(request, pk: int, index: int):
    run = selectors.run_get(pk=pk)
    sample = dashboard.round_sample(run, index)
    return render(request, "training/_round_sample.html", {"run": run, "index": index, "sample": sample})


def run_ledger(request, pk: int):
    run = selectors.run_get(pk=pk)
    return render(request, "training/_run_ledger.html",
                  {"run": run, "ledger_page": dashboard.run_ledger_page(run, request.GET.get("page"))})


def runs_compare(request):
    raw = request.GET.get("runs", "")
    error = ""
    ids: list[int] = []
    if raw:
        if not re.fullmatch(r"\s*\d{1,9}(\s*,\s*\d{1,9})*\s*", raw):
            error = "runs: give run numbers separated by commas, e.g. 1,2."
        else:
            ids = list(dict.fromkeys(int(x) for x in raw.split(",")))
            if len(ids) > MAX_COMPARED:
                error = f"runs: compare at most {MAX_COMPARED} runs at a time; got {len(ids)}."
                ids = []
    compared = dashboard.runs_compare(ids) if ids else []
    missing = sorted(set(ids) - {run.pk for run, _ in compared})
    if missing and not error:
        error = "runs: no run " + ", ".join(str(i) for i in missing) + "."
    chart = loss_tokens_chart_svg({f"run {run.pk}": dash.points for run, dash in compared},
                                  title="Held-out loss against tokens") if compared else ""
    status = 400 if error and not compared else 200
    return render(request, "training/run_compare.html", {
        "compared": compared, "chart": mark_safe(chart), "raw": raw, "error": error,  # noqa: S308
        "recent": selectors.runs_list()[:12],
    }, status=status)
