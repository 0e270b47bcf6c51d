"""The project's request parsers (``REST_FRAMEWORK["DEFAULT_PARSER_CLASSES"]``).

- JSON: DRF's own parser hands a body of ten thousand ``[`` to ``json.load``, whose ``RecursionError`` became a
  500. This one parses with ``diloco.safejson`` (the loader the upload metrics and update headers use too):
  nesting beyond ``AGORA_JSON_MAX_DEPTH``, non-finite numbers, NUL characters and lone surrogates get a 400
  naming the field and the limit.
- JSON, form and multipart bodies larger than ``AGORA_MAX_BODY_BYTES`` get a 413 before they are read (DRF's
  parsers read the whole stream into memory, or spool files to disk, whatever its size). The worker's update
  upload has its own parser and its own, per-task limit.
"""

from __future__ import annotations

from django.conf import settings
from rest_framework import parsers

from agora.api import MalformedRequest, RequestTooLarge
from diloco import safejson


def json_max_depth() -> int:
    return getattr(settings, "AGORA_JSON_MAX_DEPTH", safejson.MAX_DEPTH)


def body_max_bytes() -> int:
    return getattr(settings, "AGORA_MAX_BODY_BYTES", 1024 * 1024)


def _refuse_declared_length(request, limit: int) -> None:
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0) if request is not None else 0
    except ValueError:
        declared = 0
    if declared > limit:
        raise RequestTooLarge(f"request bodies are limited to {limit} bytes; this one is {declared}")


def _read_bounded(stream, request, limit: int) -> bytes:
    _refuse_declared_length(request, limit)
    raw = stream.read(limit + 1)
    if len(raw) > limit:
        raise RequestTooLarge(f"request bodies are limited to {limit} bytes")
    return raw


class JSONParser(parsers.JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        parser_context = parser_context or {}
        encoding = parser_context.get("encoding", settings.DEFAULT_CHARSET)
        raw = _read_bounded(stream, parser_context.get("request"), body_max_bytes())
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


class BoundedStream:
    """The part of a stream a parser may read: ``read`` past ``limit`` bytes raises ``RequestTooLarge``."""

    def __init__(self, stream, limit: int):
        self._stream, self._left, self._limit = stream, limit, limit

    def read(self, size: int = -1) -> bytes:
        want = self._left + 1 if size is None or size < 0 else min(size, self._left + 1)
        data = self._stream.read(want)
        self._left -= len(data)
        if self._left < 0:
            raise RequestTooLarge(f"request bodies are limited to {self._limit} bytes")
        return data


class FormParser(parsers.FormParser):
    def parse(self, stream, media_type=None, parser_context=None):
        parser_context = parser_context or {}
        limit = body_max_bytes()
        _refuse_declared_length(parser_context.get("request"), limit)
        return super().parse(BoundedStream(stream, limit), media_type, parser_context)


class MultiPartParser(parsers.MultiPartParser):
    """Multipart on the member API (forms of the browsable API): bounded like the other bodies. Django's
    own parser needs a declared length, so refusing by it is enough."""

    def parse(self, stream, media_type=None, parser_context=None):
        parser_context = parser_context or {}
        _refuse_declared_length(parser_context.get("request"), body_max_bytes())
        return super().parse(stream, media_type, parser_context)
