"""API plumbing shared by every app: one error shape, ``{"error": code, "detail": text, "fields": {...}}``."""

from __future__ import annotations

from django.core.exceptions import PermissionDenied
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler


def _flatten(detail, prefix: str = "") -> dict[str, list[str]]:
    """Turn DRF's nested error dict into dotted field names: ``{"spec.inner.lr": ["..."]}``."""
    out: dict[str, list[str]] = {}
    if isinstance(detail, dict):
        for key, value in detail.items():
            name = prefix if key == "non_field_errors" and prefix else (f"{prefix}.{key}" if prefix else str(key))
            out.update(_flatten(value, name))
    elif isinstance(detail, list):
        if all(not isinstance(item, (dict, list)) for item in detail):
            out[prefix or "non_field_errors"] = [str(item) for item in detail]
        else:
            for index, item in enumerate(detail):
                out.update(_flatten(item, f"{prefix}[{index}]" if prefix else str(index)))
    else:
        out[prefix or "non_field_errors"] = [str(detail)]
    return out


def error_body(code: str, detail: str, fields: dict | None = None) -> dict:
    body = {"error": code, "detail": detail}
    if fields:
        body["fields"] = fields
    return body


def error_response(code: str, detail: str, http_status: int, fields: dict | None = None) -> Response:
    return Response(error_body(code, detail, fields), status=http_status)


class RequestTooLarge(exceptions.APIException):
    """413 for a body beyond what the parser accepts, before it is read."""

    status_code = 413
    default_code = "too_large"

    def __init__(self, reason: str, *, field: str = "body"):
        super().__init__(f"{field}: {reason}")
        self.fields = {field: [reason]}


class MalformedRequest(exceptions.ParseError):
    """400 for a request the parsers refuse, naming the field (or ``body``) at fault and the limit."""

    default_code = "parse_error"

    def __init__(self, reason: str, *, field: str):
        super().__init__(f"{field}: {reason}")
        self.fields = {field: [reason]}


def exception_handler(exc, context):
    # Domain errors from any app's services carry ``code`` and ``http_status``, and may carry ``fields``
    # (duck typed, so apps need not import the project package).
    if hasattr(exc, "http_status") and hasattr(exc, "code") and isinstance(exc, Exception):
        return error_response(exc.code, str(exc), exc.http_status, getattr(exc, "fields", None))
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    if isinstance(exc, exceptions.ValidationError):
        fields = _flatten(exc.detail)
        first_name, first_messages = next(iter(fields.items()))
        detail = first_messages[0] if first_name == "non_field_errors" else f"{first_name}: {first_messages[0]}"
        return error_response("invalid", detail, status.HTTP_400_BAD_REQUEST, fields)
    response = drf_exception_handler(exc, context)
    if response is not None and isinstance(exc, exceptions.APIException):
        codes = exc.get_codes()
        code = codes if isinstance(codes, str) else "error"
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        response.data = error_body(code, str(detail), getattr(exc, "fields", None))
    return response
