from django.core.paginator import Paginator
from django.http import HttpResponseBadRequest
from django.shortcuts import render

from ledger.selectors import entries_list, ledger_head

FILTER_MAX_LENGTH = 64  # the columns' own length


def ledger_index(request):
    action = request.GET.get("action", "")
    subject = request.GET.get("subject", "")
    for name, value in (("action", action), ("subject", subject)):
        if "\x00" in value or len(value) > FILTER_MAX_LENGTH:
            return HttpResponseBadRequest(f"{name}: at most {FILTER_MAX_LENGTH} characters, no NUL characters",
                                          content_type="text/plain; charset=utf-8")
    page = Paginator(entries_list(action=action, subject=subject).order_by("-seq"), 50).get_page(
        request.GET.get("page")
    )
    return render(
        request,
        "ledger/index.html",
        {"page": page, "head": ledger_head(), "action": action, "subject": subject},
    )
