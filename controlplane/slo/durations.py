"""Durations as people write them in specs ("28d", "1h30m", "500ms") and as Prometheus wants them.

Hand-written because Prometheus' compound duration grammar (no spaces, d/h/m/s/ms, no months) is not what
any general-purpose duration library parses or prints.
"""

from __future__ import annotations

import re

_UNITS_S: dict[str, float] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
ALLOWED = "a number of seconds or a duration like 500ms, 30s, 5m, 1h30m, 28d, 1w"


def parse_duration_s(value: object, *, allow_zero: bool = False) -> float:
    """Seconds from a number (already seconds) or a duration string; ValueError says what is allowed."""
    if isinstance(value, bool):
        raise ValueError(f"expected {ALLOWED}, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if allow_zero and text in ("0", "0s"):
            return 0.0
        pos, seconds = 0, 0.0
        for match in _PART.finditer(text):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _UNITS_S[match.group(2)]
            pos = match.end()
        if pos != len(text) or not text:
            raise ValueError(f"expected {ALLOWED}, got {value!r}")
    else:
        raise ValueError(f"expected {ALLOWED}, got {value!r}")
    if seconds < 0 or (seconds == 0 and not allow_zero) or seconds != seconds:
        raise ValueError(f"must be a {'non-negative' if allow_zero else 'positive'} duration, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """Prometheus duration text, largest units first: 3360 -> "56m", 280 -> "4m40s", 0.5 -> "500ms"."""
    ms = round(seconds * 1000)
    if ms <= 0 or abs(ms - seconds * 1000) > 1e-6:
        raise ValueError(f"{seconds!r} s is not a positive whole number of milliseconds")
    out = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        count, ms = divmod(ms, size)
        if count:
            out.append(f"{count}{unit}")
    return "".join(out)
