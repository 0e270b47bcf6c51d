"""The project's JSON parser (set for every DRF view in ``REST_FRAMEWORK["DEFAULT_PARSER_CLASSES"]``).

DRF's own parser hands a body of ten thousand ``[`` to ``json.load``, whose ``RecursionError`` became a 500.
This one parses with ``diloco.safejson`` (the loader the upload metrics and update headers use too): nesting
beyond ``AGORA_JSON_MAX_DEPTH``, non-finite numbers, NUL characters and lone surrogates get a 400 naming the
field and the limit."""

from __future__ import annotations

from django.conf import settings
from rest_framework import parsers

from agora.api import MalformedRequest
from diloco import safejson


def json_max_depth() -> int:
    return getattr(settings, "AGORA_JSON_MAX_DEPTH", safejson.MAX_DEPTH)


class JSONParser(parsers.JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        try:
            text = stream.read().decode(encoding)
        except UnicodeDecodeError:
            raise MalformedRequest(f"not valid {encoding} text", field="body") from None
        try:
            return safejson.loads(text, max_depth=json_max_depth())
        except safejson.JsonRefused as exc:
            raise MalformedRequest(exc.reason, field=exc.field) from None
        except ValueError as exc:
            raise MalformedRequest(f"not valid JSON: {exc}", field="body") from None
