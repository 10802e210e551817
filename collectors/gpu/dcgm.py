"""Turn a dcgm-exporter scrape into GPU rows (the `gpu_samples` columns), units normalised.

Pure: the HTTP side lives in collector.py. A field the exporter did not expose stays None, so a
profiling-less host reads as "unknown" downstream rather than as an idle GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Final

from collectors.promtext import Sample
from controlplane import names

GpuRow = dict[str, Any]

# Every GpuSample column except `id`, in table order: rows from either source carry exactly these.
COLUMNS: Final = (
    "ts_unix_s",
    "source",
    "host",
    "gpu_index",
    "uuid",
    "mig_instance",
    "model_name",
    "util_ratio",
    "mem_copy_util_ratio",
    "fb_used_bytes",
    "fb_free_bytes",
    "power_w",
    "energy_j",
    "temp_c",
    "sm_clock_mhz",
    "xid_errors",
    "gr_engine_active_ratio",
    "tensor_active_ratio",
    "dram_active_ratio",
)

MIB: Final = 1024 * 1024


def blank_row(ts_unix_s: float, source: str) -> GpuRow:
    """A row with every reading unknown; sources fill in what they could read."""
    row: GpuRow = dict.fromkeys(COLUMNS)
    row["ts_unix_s"] = ts_unix_s
    row["source"] = source
    return row


def _percent(v: float) -> float:
    return v / 100.0


def _mib(v: float) -> int:
    return int(round(v * MIB))


def _milli(v: float) -> float:
    return v / 1000.0


def _same(v: float) -> float:
    return v


# DCGM field -> (row column, unit conversion into the column's unit).
FIELDS: Final[Mapping[str, tuple[str, Callable[[float], Any]]]] = {
    names.DCGM_GPU_UTIL: ("util_ratio", _percent),
    names.DCGM_MEM_COPY_UTIL: ("mem_copy_util_ratio", _percent),
    names.DCGM_FB_USED: ("fb_used_bytes", _mib),
    names.DCGM_FB_FREE: ("fb_free_bytes", _mib),
    names.DCGM_POWER: ("power_w", _same),
    names.DCGM_ENERGY: ("energy_j", _milli),
    names.DCGM_TEMP: ("temp_c", _same),
    names.DCGM_SM_CLOCK: ("sm_clock_mhz", _same),
    names.DCGM_XID: ("xid_errors", _same),
    names.DCGM_GR_ACTIVE: ("gr_engine_active_ratio", _same),
    names.DCGM_TENSOR_ACTIVE: ("tensor_active_ratio", _same),
    names.DCGM_DRAM_ACTIVE: ("dram_active_ratio", _same),
}


def _field(sample_name: str) -> str | None:
    """prometheus_client appends `_total` to counter samples (TOTAL_ENERGY_CONSUMPTION is one)."""
    if sample_name in FIELDS:
        return sample_name
    if sample_name.endswith("_total") and sample_name[: -len("_total")] in FIELDS:
        return sample_name[: -len("_total")]
    return None


def _host(labels: Mapping[str, str]) -> str | None:
    # dcgm-exporter <= 4.5.3 says `Hostname`; later releases say `hostname`.
    return labels.get("hostname") or labels.get("Hostname") or None


def _gpu_index(labels: Mapping[str, str]) -> int | None:
    try:
        return int(labels["gpu"])
    except (KeyError, ValueError):
        return None


def _mig_instance(labels: Mapping[str, str]) -> str | None:
    gi = labels.get("GPU_I_ID")
    if not gi:
        return None
    return f"{labels.get('GPU_I_PROFILE') or '?'}/{gi}"[:60]


def rows_from_dcgm(samples: list[Sample], ts_unix_s: float) -> list[GpuRow]:
    """One row per GPU, or per MIG instance of a partitioned GPU (keyed by UUID and the GPU instance,
    else host+`gpu` index), in first-seen order.

    Kubernetes labels (pod/namespace/container) split one GPU into several series when it is
    shared; the reading is the same GPU's, so the first series of each field wins. MIG instances
    (`GPU_I_ID`) are not the same reading: each is a row of its own.
    """
    rows: dict[tuple[str | None, ...], GpuRow] = {}
    for s in samples:
        field = _field(s.name)
        if field is None:
            continue
        uuid = s.labels.get("UUID") or None
        index = _gpu_index(s.labels)
        host = _host(s.labels)
        if uuid is None and index is None:
            continue  # not a per-GPU series
        mig = _mig_instance(s.labels)
        key: tuple[str | None, ...] = ("uuid", uuid, mig) if uuid else ("gpu", host, str(index), mig)
        row = rows.get(key)
        if row is None:
            row = blank_row(ts_unix_s, "dcgm")
            row.update(host=host, gpu_index=index, uuid=uuid, mig_instance=mig,
                       model_name=s.labels.get("modelName") or None)
            rows[key] = row
        column, convert = FIELDS[field]
        # Every field read is a level, a share or a count, never below zero, and a reading is finite: an infinite
        # or negative value (a blank field some exporters write as a sentinel) is unknown, not a figure.
        if row[column] is None and math.isfinite(s.value) and s.value >= 0:
            row[column] = convert(s.value)
    return list(rows.values())
