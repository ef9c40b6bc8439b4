"""Durations (``90s``, ``1m30s``, ``250ms``) and RFC 3339 time stamps, as the API writes them."""

from __future__ import annotations

import datetime as dt
import re

# The API's Duration type (api/base.py) guarantees this shape.
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_RFC3339 = "%Y-%m-%dT%H:%M:%SZ"


def seconds(duration: str) -> float:
    """``'1m30s'`` → 90.0; ``'250ms'`` → 0.25."""
    return sum(float(n) * _UNITS[u] for n, u in _PART.findall(duration))


def format_seconds(value: float) -> str:
    """The shortest Duration for a whole number of seconds (``90`` → ``'90s'``)."""
    return f"{int(value)}s"


def rfc3339(moment: dt.datetime) -> str:
    """``2026-11-26T12:00:00Z``: UTC, whole seconds (the form status fields carry)."""
    return moment.astimezone(dt.UTC).replace(microsecond=0).strftime(_RFC3339)


def parse_rfc3339(text: str) -> dt.datetime | None:
    """The inverse of :func:`rfc3339`, timezone-aware; None for an empty field."""
    if not text:
        return None
    return dt.datetime.strptime(text, _RFC3339).replace(tzinfo=dt.UTC)
