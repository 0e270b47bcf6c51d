"""Pages of the compute pool: the public pool, "My workers", "Add a worker" and a worker's page."""

from __future__ import annotations

from urllib.parse import urlsplit

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import FileResponse, Http404, HttpResponse
from django.shortcuts import redirect, render
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from ledger.selectors import entries_for_subjects
from marketplace import agent_package, selectors, services
from marketplace.errors import MarketplaceError
from marketplace.forms import AddWorkerForm, SuspendForm


def pool(request):
    paginator = Paginator(selectors.worker_list_public(), 25)
    page = paginator.get_page(request.GET.get("page"))
    page.object_list = selectors.with_live_state(page.object_list)
    return render(request, "marketplace/pool.html", {
        "totals": selectors.pool_totals(),
        "leaderboard": selectors.credit_leaderboard(limit=10),
        "page": page,
    })


@login_required
def my_workers(request):
    context = {
        "workers": selectors.worker_list_for_owner(user=request.user),
        "credits": selectors.member_credits(user=request.user),
        "pending_tokens": selectors.enrollment_tokens_pending(user=request.user),
        "poll_s": 5,
    }
    if request.htmx:
        return render(request, "marketplace/_my_workers_table.html", context)
    return render(request, "marketplace/my_workers.html", context)


def _server_url(request) -> str:
    """The URL agents should use: ``AGORA_PUBLIC_URL``, unless it is the local default and the page was
    reached under another host (then that host is what the volunteer can reach)."""
    public = (settings.AGORA_PUBLIC_URL or "").rstrip("/")
    host = (urlsplit(public).hostname or "") if public else ""
    if not public or (host in ("127.0.0.1", "localhost") and request.get_host().split(":")[0] not in (
            "127.0.0.1", "localhost", "testserver")):
        return request.build_absolute_uri("/").rstrip("/")
    return public


@login_required
def add_worker(request):
    form = AddWorkerForm(request.POST or None)
    created = None
    if request.method == "POST" and form.is_valid():
        created = services.enrollment_token_create(owner=request.user, name=form.cleaned_data["name"])
        messages.success(request, "Enrollment token created. Copy it now: it is shown only once.")
    server_url = _server_url(request)
    wheel = _agent_wheel()
    return render(request, "marketplace/add_worker.html", {
        "form": form if created is None else AddWorkerForm(),
        "wheel": wheel,
        "wheel_url": f"{server_url}/agent/{wheel.filename}" if wheel else None,
        "token": created.token if created else None,
        "token_record": created.record if created else None,
        "worker_name": (created.record.name if created else "") or "my-worker",
        "server_url": server_url,
        "ttl_hours": round(settings.AGORA_ENROLLMENT_TOKEN_TTL.total_seconds() / 3600, 1),
        "pending_tokens": selectors.enrollment_tokens_pending(user=request.user),
    })


def _agent_wheel():
    """The served agent wheel, built on first use; ``None`` (and the page says so) if it cannot be built."""
    try:
        return agent_package.current_wheel()
    except (agent_package.AgentPackageError, OSError):
        return None


def agent_file(request, filename: str):
    """The agent's wheel (immutable for its name's version) and its Dockerfile, with no log-in needed."""
    if filename == "Dockerfile":
        wheel = _agent_wheel()
        if wheel is None:
            raise Http404("the agent package is not available on this server")
        text = (agent_package.project_dir() / "Dockerfile").read_text(encoding="utf-8")
        text = text.replace("ARG AGENT_WHEEL_URL\n",
                            f"ARG AGENT_WHEEL_URL={_server_url(request)}/agent/{wheel.filename}\n", 1)
        return HttpResponse(text, content_type="text/plain; charset=utf-8")
    if not agent_package.WHEEL_NAME_RE.match(filename):
        raise Http404("no such file")
    wheel = _agent_wheel()
    if wheel is None or wheel.filename != filename:
        raise Http404("no such file: this server offers " + (wheel.filename if wheel else "no agent package"))
    response = FileResponse(wheel.path.open("rb"), content_type="application/zip", as_attachment=True,
                            filename=filename)
    response["X-Content-SHA256"] = wheel.sha256
    response["Cache-Control"] = "public, max-age=300"
    return response


def worker_detail(request, worker_id: int):
    worker = selectors.worker_get(worker_id=worker_id)
    if worker is None:
        raise Http404("no such worker")
    selectors.with_live_state([worker])
    return render(request, "marketplace/worker_detail.html", {
        "worker": worker,
        "is_owner": request.user.is_authenticated and request.user.pk == worker.owner_id,
        "grants": selectors.credit_grants_for_worker(worker=worker),
        "entries": entries_for_subjects(subjects=[worker.ledger_label], limit=50),
        "suspend_form": SuspendForm(),
    })


def _act(request, worker_id: int, action, success: str, **kwargs):
    worker = selectors.worker_get(worker_id=worker_id)
    if worker is None:
        raise Http404("no such worker")
    try:
        action(worker=worker, by=request.user, **kwargs)
    except MarketplaceError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, success.format(name=worker.name))
    target = request.POST.get("next", "")
    if target and url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}):
        return redirect(target)
    return redirect("marketplace:worker_detail", worker_id=worker_id)


@login_required
@require_POST
def worker_revoke(request, worker_id: int):
    return _act(request, worker_id, services.worker_revoke,
                "{name} was revoked: its token no longer works. Enroll the machine again to bring it back.")


@login_required
@require_POST
def worker_suspend(request, worker_id: int):
    form = SuspendForm(request.POST)
    if not form.is_valid():
        messages.error(request, "A reason is required to suspend a worker.")
        return redirect("marketplace:worker_detail", worker_id=worker_id)
    return _act(request, worker_id, services.worker_suspend, "{name} is suspended.", reason=form.cleaned_data["reason"])


@login_required
@require_POST
def worker_reinstate(request, worker_id: int):
    return _act(request, worker_id, services.worker_reinstate, "{name} is reinstated.")
