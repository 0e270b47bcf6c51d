"""Error pages: JSON in the API's error shape under /api/, finished HTML pages everywhere else."""

from __future__ import annotations

import logging

from django.http import HttpResponseServerError, JsonResponse
from django.shortcuts import render
from django.template import loader

log = logging.getLogger(__name__)


def _is_api(request) -> bool:
    return request.path.startswith("/api/")


def page_not_found(request, exception=None):
    if _is_api(request):
        return JsonResponse({"error": "not_found", "detail": f"No API endpoint or object at {request.path}."},
                            status=404)
    return render(request, "404.html", {"path": request.path}, status=404)


def server_error(request):
    if _is_api(request):
        return JsonResponse({"error": "server_error",
                             "detail": "The server failed to answer this request; it has been logged. "
                                       "Nothing was changed by it. Try again later."}, status=500)
    # No context processors or database here: the failure may be theirs.
    return HttpResponseServerError(loader.get_template("500.html").render())


def permission_denied(request, exception=None):
    if _is_api(request):
        return JsonResponse({"error": "permission_denied", "detail": "You may not do this."}, status=403)
    return render(request, "403.html", {"reason": str(exception or "")}, status=403)
