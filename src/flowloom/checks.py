"""Checks of the numbers given in code: settings and timeouts.

A setting out of its range raises ``ValueError`` naming it when the object is made,
rather than a request hanging later (a retention of 1e308 seconds is more than Redis
takes: every request then failed to end). ``timeout`` turns a wait's timeout into
what the waits take: ``None`` (for ever) for anything beyond ``FOREVER``.
"""

from __future__ import annotations

__all__ = ["FOREVER", "MAX_SECONDS", "count", "seconds", "timeout"]

MAX_SECONDS = 100 * 365 * 86400.0  # the longest duration a setting may give: 100 years
FOREVER = 1e9  # seconds (31 years): a timeout longer than this waits for ever


def seconds(name: str, value: float, *, zero: bool = False) -> float:
    """``value``, a duration setting: a finite number of seconds, more than 0 (or 0 with
    ``zero``), at most ``MAX_SECONDS``."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number of seconds, not {type(value).__name__}")
    low_ok = value >= 0 if zero else value > 0
    if not (low_ok and value <= MAX_SECONDS):  # NaN fails both
        low = ">= 0" if zero else "> 0"
        raise ValueError(f"{name} must be a number of seconds {low} and <= {MAX_SECONDS:g}")
    return float(value)


def count(name: str, value: int, low: int, high: int) -> int:
    """``value``, a whole-number setting from ``low`` to ``high``."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer from {low:,} to {high:,}")
    return value


def timeout(value: float | None) -> float | None:
    """A wait's ``timeout`` in seconds: ``None`` or more than ``FOREVER`` (infinity too)
    waits for ever; a negative one is 0 (look once); NaN or a non-number is refused."""
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or value != value:  # NaN
        raise ValueError(f"timeout must be a number of seconds or None, not {value!r:.40}")
    if value > FOREVER:
        return None
    return max(0.0, float(value))
