"""``{% run_dashboard run %}``: the dashboard block of a run's page, with its own context."""

from django import template
from django.utils.safestring import mark_safe

from training.charts import loss_tokens_chart_svg
from training.dashboard import run_dashboard

register = template.Library()


@register.inclusion_tag("training/_run_dashboard.html")
def run_dashboard_block(run, rounds=None):
    dash = run_dashboard(run, rounds)
    chart = loss_tokens_chart_svg({"held-out loss": dash.points}, title=f"Run {run.pk}: loss against tokens")
    sample_rounds = [p.round for p in dash.points if p.round and p.accepted]
    return {"run": run, "dash": dash, "tokens_chart": mark_safe(chart),  # noqa: S308 (built from numbers)
            "sample_rounds": sample_rounds[-12:][::-1]}
