from django.core.paginator import Paginator
from django.shortcuts import render

from ledger.selectors import entries_list, ledger_head


def ledger_index(request):
    action = request.GET.get("action", "")
    subject = request.GET.get("subject", "")
    page = Paginator(entries_list(action=action, subject=subject).order_by("-seq"), 50).get_page(
        request.GET.get("page")
    )
    return render(
        request,
        "ledger/index.html",
        {"page": page, "head": ledger_head(), "action": action, "subject": subject},
    )
