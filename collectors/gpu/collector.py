"""Periodic GPU telemetry: dcgm-exporter when one is deployed, else NVML on this host.

No reading is ever invented: a failed scrape or NVML query writes nothing (unknown, not zero).
A host without NVIDIA GPUs (CPU dev boxes, CI) is normal, so it is said once at INFO and then the
collector stays silent instead of retrying and warning every interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx

from collectors.gpu.dcgm import GpuRow, rows_from_dcgm
from collectors.gpu.nvml import read_nvml
from collectors.promtext import scrape

_LOG = logging.getLogger(__name__)


class GpuCollector:
    """Reads GPU rows and hands them to `write` (the store); one instance per plane process."""

    def __init__(
        self,
        write: Callable[[list[GpuRow]], None],
        *,
        dcgm_url: str | None = None,
        client: httpx.AsyncClient | None = None,
        nvml_module: object | None = None,
        clock: Callable[[], float] = time.time,
        host: str | None = None,
        log: logging.Logger | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        self._write = write
        self._dcgm_url = dcgm_url
        self._client = client
        self._owns_client = False
        self._nvml_module = nvml_module  # None: import pynvml on first use
        self._nvml: Any = None  # set once nvmlInit succeeded and found devices
        self._clock = clock
        self._host = host if host is not None else socket.gethostname()
        self._log = log if log is not None else _LOG
        self._timeout_s = timeout_s
        self._available: bool | None = None
        self._failing = False  # inside a streak of failures: warn at its start only

    @property
    def available(self) -> bool | None:
        """None until the first attempt; False once NVML found no GPU (or DCGM exposes none)."""
        return self._available

    async def collect_once(self) -> list[GpuRow]:
        """Read every GPU once; write and return the rows (empty when nothing could be read)."""
        ts = self._clock()
        rows = await (self._from_dcgm(ts) if self._dcgm_url is not None else self._from_nvml(ts))
        if rows:
            # Off the event loop: it also serves the API and the receivers, and a busy store can hold a write.
            await asyncio.to_thread(self._write, rows)
        return rows

    async def run(self, stop: asyncio.Event, interval_s: float) -> None:
        """Collect every `interval_s` until `stop` is set; errors are logged, never fatal."""
        loop = asyncio.get_running_loop()
        try:
            while not stop.is_set():
                deadline = loop.time() + interval_s
                try:
                    await self.collect_once()
                except Exception:
                    self._log.exception("GPU telemetry collection failed")
                if self._dcgm_url is None and self._available is False:
                    await stop.wait()  # no GPU here: nothing to poll, and nothing more to say
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=max(0.0, deadline - loop.time()))
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Release NVML and the HTTP client if this collector opened them."""
        if self._nvml is not None:
            nvml, self._nvml = self._nvml, None
            try:
                await asyncio.to_thread(nvml.nvmlShutdown)
            except Exception as exc:  # shutting down: nothing useful to do about it
                self._log.debug("nvmlShutdown failed: %s", exc)
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client, self._owns_client = None, False

    # --- DCGM -----------------------------------------------------------------------------------

    async def _from_dcgm(self, ts: float) -> list[GpuRow]:
        assert self._dcgm_url is not None
        if self._client is None:
            self._client, self._owns_client = httpx.AsyncClient(), True
        result = await scrape(self._client, self._dcgm_url, self._timeout_s)
        if not result.ok:
            self._failed(f"dcgm-exporter scrape failed: {result.error}; GPU readings unknown")
            return []
        rows = rows_from_dcgm(result.samples, ts)
        if not rows:
            self._failed(f"{self._dcgm_url} exposes no DCGM GPU series; GPU readings unknown")
        else:
            self._recovered("dcgm-exporter")
        self._available = bool(rows)
        return rows

    # --- NVML -----------------------------------------------------------------------------------

    async def _from_nvml(self, ts: float) -> list[GpuRow]:
        if self._available is False:
            return []
        if self._nvml is None:
            reason = await asyncio.to_thread(self._init_nvml)
            if reason is not None:
                if self._available:  # it worked before (a driver reload in progress?): unknown now, try again
                    self._failed(f"NVML could not be started again ({reason}); GPU readings unknown")
                    return []
                self._available = False
                self._log.info("no NVIDIA GPU found on this host (%s); GPU telemetry disabled", reason)
                return []
            self._available = True
        nvml = self._nvml
        try:
            rows = await asyncio.to_thread(read_nvml, nvml, ts, self._host)
        except nvml.NVMLError as exc:
            self._failed(f"NVML read failed: {exc}; GPU readings unknown")
            # After a driver reload (NVML_ERROR_UNINITIALIZED, DRIVER_NOT_LOADED) this NVML session stays dead:
            # it is shut down and started again next round, rather than failing until the plane restarts.
            self._nvml = None
            try:
                await asyncio.to_thread(nvml.nvmlShutdown)
            except Exception as shutdown_exc:  # noqa: BLE001 - the session is being dropped anyway
                self._log.debug("nvmlShutdown failed: %s", shutdown_exc)
            return []
        blind = [r["gpu_index"] for r in rows if r["uuid"] is None and r["util_ratio"] is None
                 and r["fb_used_bytes"] is None]
        if blind:  # e.g. a GPU fallen off the bus: its row is stored with every reading unknown
            self._failed(f"NVML gave no reading for GPU {', '.join(map(str, blind))}; those readings are unknown")
        else:
            self._recovered("NVML")
        return rows

    def _init_nvml(self) -> str | None:
        """Load and start NVML; returns why GPU telemetry is unavailable, or None when it is."""
        nvml: Any = self._nvml_module
        if nvml is None:
            try:
                nvml = importlib.import_module("pynvml")
            except ImportError as exc:
                return f"pynvml not importable: {exc}"
        try:
            nvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded, or a broken lib
            return f"nvmlInit failed: {exc}"
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            count, why = 0, f"nvmlDeviceGetCount failed: {exc}"
        else:
            why = "NVML reports 0 devices"
        if count == 0:
            try:
                nvml.nvmlShutdown()
            except Exception as exc:
                self._log.debug("nvmlShutdown failed: %s", exc)
            return why
        self._nvml = nvml
        return None

    # --- logging of failure streaks -----------------------------------------------------------

    def _failed(self, message: str) -> None:
        if self._failing:
            self._log.debug("%s", message)
        else:
            self._log.warning("%s", message)
        self._failing = True

    def _recovered(self, source: str) -> None:
        if self._failing:
            self._log.info("GPU telemetry from %s recovered", source)
        self._failing = False
