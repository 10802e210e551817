"""Read GPU rows straight from NVML when no dcgm-exporter is deployed (single hosts, dev boxes).

The NVML module is injected (real `pynvml` or a test fake with the same names) so this runs and is
tested without a GPU. Units are normalised to the DCGM ones so both sources fill the same table.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from collectors.gpu.dcgm import GpuRow, blank_row

T = TypeVar("T")


def _text(v: object) -> str:
    """Old pynvml returns bytes for strings, nvidia-ml-py returns str."""
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def _try(nvml: Any, call: Callable[[], T]) -> T | None:
    """One NVML query; NotSupported (or any NVML error) means unknown, not zero."""
    try:
        return call()
    except nvml.NVMLError:
        return None


def read_nvml(nvml: Any, ts_unix_s: float, host: str | None) -> list[GpuRow]:
    """One row per device; nvmlInit is the caller's. nvmlDeviceGetCount errors propagate."""
    rows: list[GpuRow] = []
    for index in range(int(nvml.nvmlDeviceGetCount())):
        row = blank_row(ts_unix_s, "nvml")
        row.update(host=host, gpu_index=index)
        rows.append(row)
        handle = _try(nvml, functools.partial(nvml.nvmlDeviceGetHandleByIndex, index))
        if handle is None:
            continue  # e.g. GPU fallen off the bus: it exists, its readings are unknown
        _fill(nvml, handle, row)
    return rows


def _fill(nvml: Any, h: Any, row: GpuRow) -> None:
    uuid = _try(nvml, lambda: nvml.nvmlDeviceGetUUID(h))
    row["uuid"] = None if uuid is None else _text(uuid)
    name = _try(nvml, lambda: nvml.nvmlDeviceGetName(h))
    row["model_name"] = None if name is None else _text(name)

    util = _try(nvml, lambda: nvml.nvmlDeviceGetUtilizationRates(h))
    if util is not None:
        row["util_ratio"] = util.gpu / 100.0
        row["mem_copy_util_ratio"] = util.memory / 100.0
    mem = _try(nvml, lambda: nvml.nvmlDeviceGetMemoryInfo(h))
    if mem is not None:
        row["fb_used_bytes"] = int(mem.used)
        row["fb_free_bytes"] = int(mem.free)

    power_mw = _try(nvml, lambda: nvml.nvmlDeviceGetPowerUsage(h))
    row["power_w"] = None if power_mw is None else power_mw / 1000.0
    energy_mj = _try(nvml, lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(h))
    row["energy_j"] = None if energy_mj is None else energy_mj / 1000.0
    temp = _try(nvml, lambda: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU))
    row["temp_c"] = None if temp is None else float(temp)
    clock = _try(nvml, lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM))
    row["sm_clock_mhz"] = None if clock is None else float(clock)
    # xid_errors and the DCGM profiling ratios have no NVML equivalent here: they stay None.
