"""The project's JSON parser (set for every DRF view in ``REST_FRAMEWORK["DEFAULT_PARSER_CLASSES"]``).

DRF's own parser hands a body of ten thousand ``[`` to ``json.load``, whose ``RecursionError`` became a 500.
This one parses with ``diloco.safejson`` (the loader the upload metrics and update headers use too): nesting
beyond ``AGORA_JSON_MAX_DEPTH``, non-finite numbers, NUL characters and lone surrogates get a 400 naming the
field and the limit; a body over ``AGORA_MAX_JSON_BYTES`` is a 413 before it is read into memory."""

from __future__ import annotations

from django.conf import settings
from rest_framework import parsers

from agora.api import MalformedRequest, RequestTooLarge
from diloco import safejson


def json_max_depth() -> int:
    return getattr(settings, "AGORA_JSON_MAX_DEPTH", safejson.MAX_DEPTH)


def json_max_bytes() -> int:
    return getattr(settings, "AGORA_MAX_JSON_BYTES", 1024 * 1024)


def _read_bounded(stream, request, limit: int) -> bytes:
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0) if request is not None else 0
    except ValueError:
        declared = 0
    if declared > limit:
        raise RequestTooLarge(f"JSON bodies are limited to {limit} bytes; this one is {declared}")
    raw = stream.read(limit + 1)
    if len(raw) > limit:
        raise RequestTooLarge(f"JSON bodies are limited to {limit} bytes")
    return raw


class JSONParser(parsers.JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        parser_context = parser_context or {}
        encoding = parser_context.get("encoding", settings.DEFAULT_CHARSET)
        raw = _read_bounded(stream, parser_context.get("request"), json_max_bytes())
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            raise MalformedRequest(f"not valid {encoding} text", field="body") from None
        try:
            return safejson.loads(text, max_depth=json_max_depth())
        except safejson.JsonRefused as exc:
            raise MalformedRequest(exc.reason, field=exc.field) from None
        except ValueError as exc:
            raise MalformedRequest(f"not valid JSON: {exc}", field="body") from None
