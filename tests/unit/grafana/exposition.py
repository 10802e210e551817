"""Series names a Prometheus text exposition gives a scraper, shared with the real-Prometheus test.

Read line by line rather than with prometheus_client's parser: that parser renames counter samples to `<name>_total`
(dcgm-exporter's `DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION` would come back as `..._total`), while Prometheus stores the
name exactly as exposed. A sample line starts with its name (the exposition format guarantees it), so nothing else
needs parsing.
"""

from __future__ import annotations

import re

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_TYPE = re.compile(r"#\s+TYPE\s+(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\s+(?P<type>\w+)")
# The series a declared family will have once it has samples, as prometheus_client (the plane) renders them.
_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}


def exposed_names(text: str) -> set[str]:
    """Every sample name, plus the names of families declared with no samples yet (an SLO with no traffic, a
    counter nobody incremented), which follow from the family's type."""
    samples: set[str] = set()
    declared: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            if m := _TYPE.match(line):
                declared[m["name"]] = m["type"]
            continue
        if m := _NAME.match(line):
            samples.add(m.group())
    out = set(samples)
    for family, kind in declared.items():
        if kind == "counter":
            series: tuple[str, ...] = (family if family.endswith("_total") else f"{family}_total",)
        else:
            series = tuple(family + s for s in _SUFFIXES.get(kind, ("",)))
        if not any(s in samples for s in series) and not any(n.startswith(family) for n in samples):
            out.update(series)
    return out
