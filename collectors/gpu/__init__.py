"""GPU telemetry: dcgm-exporter scrapes or direct NVML reads, both as `gpu_samples` rows."""

from collectors.gpu.collector import GpuCollector
from collectors.gpu.dcgm import COLUMNS, GpuRow, rows_from_dcgm
from collectors.gpu.nvml import read_nvml

__all__ = ["COLUMNS", "GpuCollector", "GpuRow", "read_nvml", "rows_from_dcgm"]
