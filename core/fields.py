"""Strict number fields for DRF serializers: JSON booleans are not numbers, and a float must be finite."""

from __future__ import annotations

import math

from rest_framework import serializers


class FiniteFloatField(serializers.FloatField):
    """A float that is not a boolean, NaN or an infinity."""

    default_error_messages = {"finite": "Must be a finite number.", "invalid": "A number is required."}

    def to_internal_value(self, data):
        if isinstance(data, bool):
            self.fail("invalid")
        value = super().to_internal_value(data)
        if not math.isfinite(value):
            self.fail("finite")
        return value


class StrictIntegerField(serializers.IntegerField):
    """An integer that is not a boolean or a float with a fraction (``2.0`` is 2, ``2.5`` is refused)."""

    def to_internal_value(self, data):
        if isinstance(data, bool):
            self.fail("invalid")
        if isinstance(data, float) and not data.is_integer():
            self.fail("invalid")
        return super().to_internal_value(data)
