"""The project's pagination (``REST_FRAMEWORK["DEFAULT_PAGINATION_CLASS"]``): limit/offset, range-checked.

DRF's ``LimitOffsetPagination`` passes any ``offset`` to the database (``?offset=1e30`` digits answered 500,
``bigint out of range``), has no ``max_limit`` and silently ignores a ``limit`` it cannot read. Here both are
integers in a documented range, and anything else is a 400 naming the parameter."""

from __future__ import annotations

import re

from rest_framework import pagination, serializers

MAX_LIMIT = 100
MAX_OFFSET = 1_000_000
_DIGITS = re.compile(r"[0-9]{1,12}")


class LimitOffsetPagination(pagination.LimitOffsetPagination):
    max_limit = MAX_LIMIT
    max_offset = MAX_OFFSET

    def _read(self, request, name: str, default: int, low: int, high: int) -> int:
        raw = request.query_params.get(name)
        if raw is None or raw == "":
            return default
        value = int(raw) if _DIGITS.fullmatch(raw) else None
        if value is None or not low <= value <= high:
            raise serializers.ValidationError({name: [f"Must be an integer from {low} to {high}."]})
        return value

    def get_limit(self, request):
        return self._read(request, self.limit_query_param, self.default_limit, 1, self.max_limit)

    def get_offset(self, request):
        return self._read(request, self.offset_query_param, 0, 0, self.max_offset)

    def get_schema_operation_parameters(self, view):
        parameters = super().get_schema_operation_parameters(view)
        bounds = {
            self.limit_query_param: {"minimum": 1, "maximum": self.max_limit, "default": self.default_limit},
            self.offset_query_param: {"minimum": 0, "maximum": self.max_offset, "default": 0},
        }
        for parameter in parameters:
            parameter["schema"].update(bounds.get(parameter["name"], {}))
        return parameters
