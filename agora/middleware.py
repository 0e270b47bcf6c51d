"""Requests no view should see, refused before they reach the database, and JSON errors under ``/api/``.

- A NUL character in the path, a query parameter or a header (``/api/v1/checkpoints/%00``, ``?q=a%00b``,
  ``Authorization: Token a\0b``, a session cookie): PostgreSQL cannot store or compare one, so it used to
  surface as a 500 from the token or session lookup. Now 400 naming the parameter or header.
- An integer path parameter beyond a 64-bit id (``/api/v1/runs/99999999999999999999/``): no row can have it,
  and the database would fail on the comparison. Now 404 naming the parameter.
- Any other 404 under ``/api/`` that Django answers itself (a path no pattern matches) is rendered in the
  API's error shape instead of the HTML page, so clients always get ``{"error", "detail"}``.
"""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import TooManyFieldsSent
from django.http import HttpResponseBadRequest, HttpResponseNotFound, JsonResponse

from agora.api import error_body

API_PREFIX = "/api/"
MAX_ID = 2**63 - 1  # PostgreSQL bigint, SQLite integer


def _is_api(request) -> bool:
    return request.path_info.startswith(API_PREFIX)


def _nul_parameter(request) -> str | None:
    if "\x00" in request.path_info:
        return "path"
    for key, value in request.META.items():
        if key.startswith("HTTP_") and isinstance(value, str) and "\x00" in value:
            return f"{key[5:].replace('_', '-').title()} header"
    for key, values in request.GET.lists():
        if "\x00" in key:
            return "query string"
        if any("\x00" in value for value in values):
            return key
    return None


class RefuseMalformedRequestsMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        try:
            name, reason = _nul_parameter(request), "NUL characters are not allowed"
        except TooManyFieldsSent:
            name, reason = "query string", f"more than {settings.DATA_UPLOAD_MAX_NUMBER_FIELDS} parameters"
        if name is not None:
            if _is_api(request):
                return JsonResponse(error_body("invalid", f"{name}: {reason}", {name: [reason]}), status=400)
            return HttpResponseBadRequest(f"{name}: {reason}", content_type="text/plain; charset=utf-8")
        response = self.get_response(request)
        if (
            response.status_code == 404
            and _is_api(request)
            and not hasattr(response, "data")  # DRF's own answers (JSON, or HTML for the browsable API) stay
            and not response.get("Content-Type", "").startswith("application/json")
            and not getattr(response, "streaming", False)
        ):
            return JsonResponse(error_body("not_found", "No such API endpoint."), status=404)
        return response

    def process_view(self, request, view_func, view_args, view_kwargs):
        for name, value in view_kwargs.items():
            if isinstance(value, int) and not 0 <= value <= MAX_ID:
                reason = f"no object has an id beyond {MAX_ID}"
                if _is_api(request):
                    return JsonResponse(error_body("not_found", f"{name}: {reason}", {name: [reason]}), status=404)
                return HttpResponseNotFound(f"{name}: {reason}", content_type="text/plain; charset=utf-8")
        return None
