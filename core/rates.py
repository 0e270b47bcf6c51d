"""Rate strings (``"10/min"``, ``"5/15min"``): parsed here, with no Django machinery, so settings can
check them when they load."""

from __future__ import annotations

import re

from django.core.exceptions import ImproperlyConfigured

_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600,
          "d": 86400, "day": 86400}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([a-z]+?)s?\s*$")


def parse_rate(rate: str) -> tuple[int, int]:
    """``"10/min"`` -> (10, 60); ``"5/15min"`` -> (5, 900). Raises ``ImproperlyConfigured`` otherwise."""
    match = _RATE.match(rate or "")
    if not match or match.group(3) not in _UNITS or int(match.group(2) or 1) < 1:
        raise ImproperlyConfigured(f"not a rate: {rate!r} (write N/s, N/min, N/hour, N/day or N/<k><unit>)")
    count, multiplier, unit = match.groups()
    return int(count), int(multiplier or 1) * _UNITS[unit]
