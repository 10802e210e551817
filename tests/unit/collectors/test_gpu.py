"""GPU telemetry: dcgm-exporter text and NVML readings become `gpu_samples` rows in DCGM units."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from collectors.gpu import COLUMNS, GpuCollector, read_nvml, rows_from_dcgm
from collectors.promtext import parse
from controlplane.store.models import GpuSample

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
TS = 1_750_000_000.5
MIB = 1024 * 1024
LOGGER = "tests.gpu"


def fixture_text(name: str) -> str:
    return (FIXTURES / name).read_text()


def by_index(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {r["gpu_index"]: r for r in rows}


# --- dcgm-exporter ---------------------------------------------------------------------------------


def test_rows_carry_exactly_the_gpu_sample_columns_except_id() -> None:
    expected = {c.name for c in GpuSample.__table__.columns} - {"id"}
    assert set(COLUMNS) == expected
    for row in rows_from_dcgm(parse(fixture_text("dcgm_4.5.2.txt")), TS):
        assert set(row) == expected


def test_dcgm_4_5_2_text_is_normalised_to_ratios_bytes_watts_and_joules() -> None:
    rows = rows_from_dcgm(parse(fixture_text("dcgm_4.5.2.txt")), TS)

    assert len(rows) == 2
    gpus = by_index(rows)
    assert gpus[0] == {
        "ts_unix_s": TS,
        "source": "dcgm",
        "host": "gpu-node-01",
        "gpu_index": 0,
        "uuid": "GPU-5f3c9a2e-1b7d-4e8a-9c6f-0d2e4b8a7c13",
        "mig_instance": None,
        "model_name": "NVIDIA H100 80GB HBM3",
        "util_ratio": 0.87,
        "mem_copy_util_ratio": 0.41,
        "fb_used_bytes": 82_952_847_360,
        "fb_free_bytes": 2_064_646_144,
        "power_w": 523.417,
        "energy_j": 987_654_321.098,
        "temp_c": 61.0,
        "sm_clock_mhz": 1980.0,
        "xid_errors": 0.0,
        "gr_engine_active_ratio": 0.912345,
        "tensor_active_ratio": 0.423456,
        "dram_active_ratio": 0.671234,
    }
    idle = gpus[1]
    assert idle["uuid"] == "GPU-a41e7d08-6c2b-4f93-8e15-3b9d2c6f0a74"
    assert idle["util_ratio"] == 0.0  # a real zero stays zero ...
    assert idle["fb_used_bytes"] == 0
    assert idle["fb_free_bytes"] == 81079 * MIB
    assert idle["power_w"] == 71.205
    assert idle["energy_j"] == 412_345_678.901
    assert idle["tensor_active_ratio"] == 0.0
    assert isinstance(idle["fb_free_bytes"], int)


def test_dcgm_4_6_kubernetes_text_gives_one_row_per_gpu_with_the_lowercase_hostname() -> None:
    rows = rows_from_dcgm(parse(fixture_text("dcgm_4.6_k8s.txt")), TS)

    assert [r["uuid"] for r in rows] == [
        "GPU-0c9e2f61-7a3d-4b58-b1e4-9f6a2d8c5e37",  # shared by two pods, still one row
        "GPU-e27b4d95-3f8a-4c16-a0d2-6b1f9e7c4a58",
    ]
    assert {r["host"] for r in rows} == {"gpu-node-07"}
    gpus = by_index(rows)
    assert gpus[0]["util_ratio"] == 0.64
    assert gpus[0]["fb_used_bytes"] == 80_631_300_096
    assert gpus[1]["power_w"] == 611.902
    assert gpus[1]["energy_j"] == 60_123_456.789
    assert gpus[1]["fb_free_bytes"] == 1_258_291_200
    assert all("pod" not in r and "namespace" not in r for r in rows)


def test_profiling_fields_the_exporter_did_not_expose_stay_unknown_not_zero() -> None:
    rows = rows_from_dcgm(parse(fixture_text("dcgm_4.6_k8s.txt")), TS)

    for row in rows:
        assert row["gr_engine_active_ratio"] is None
        assert row["tensor_active_ratio"] is None
        assert row["dram_active_ratio"] is None
        assert row["util_ratio"] is not None


def test_a_family_missing_from_the_scrape_leaves_only_that_column_none() -> None:
    text = "\n".join(
        line
        for line in fixture_text("dcgm_4.5.2.txt").splitlines()
        if "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION" not in line
    )
    rows = rows_from_dcgm(parse(text + "\n"), TS)

    assert [r["energy_j"] for r in rows] == [None, None]
    assert [r["power_w"] for r in rows] == [523.417, 71.205]


def test_when_one_gpu_appears_under_several_pods_the_first_series_wins() -> None:
    text = (
        "# TYPE DCGM_FI_DEV_GPU_UTIL gauge\n"
        'DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-a",hostname="n1",pod="p1",namespace="ns"} 30\n'
        'DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-a",hostname="n1",pod="p2",namespace="ns"} 70\n'
    )
    rows = rows_from_dcgm(parse(text), TS)

    assert len(rows) == 1
    assert rows[0]["util_ratio"] == 0.3


def test_each_mig_instance_of_a_partitioned_gpu_is_its_own_row() -> None:
    text = (
        "# TYPE DCGM_FI_DEV_FB_USED gauge\n"
        'DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-abc",GPU_I_PROFILE="1g.10gb",GPU_I_ID="9",Hostname="n1"} 512\n'
        'DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-abc",GPU_I_PROFILE="3g.40gb",GPU_I_ID="2",Hostname="n1"} 38000\n'
        "# TYPE DCGM_FI_PROF_GR_ENGINE_ACTIVE gauge\n"
        'DCGM_FI_PROF_GR_ENGINE_ACTIVE{gpu="0",UUID="GPU-abc",GPU_I_PROFILE="1g.10gb",GPU_I_ID="9"} 0.01\n'
        'DCGM_FI_PROF_GR_ENGINE_ACTIVE{gpu="0",UUID="GPU-abc",GPU_I_PROFILE="3g.40gb",GPU_I_ID="2"} 0.97\n'
    )
    rows = {r["mig_instance"]: r for r in rows_from_dcgm(parse(text), TS)}

    assert set(rows) == {"1g.10gb/9", "3g.40gb/2"}
    assert rows["3g.40gb/2"]["fb_used_bytes"] == 38000 * 2**20 and rows["3g.40gb/2"]["gr_engine_active_ratio"] == 0.97
    assert rows["1g.10gb/9"]["fb_used_bytes"] == 512 * 2**20 and rows["1g.10gb/9"]["gr_engine_active_ratio"] == 0.01


def test_gpus_without_a_uuid_label_are_keyed_by_their_gpu_index() -> None:
    text = (
        "# TYPE DCGM_FI_DEV_GPU_TEMP gauge\n"
        'DCGM_FI_DEV_GPU_TEMP{gpu="0",Hostname="n1"} 40\n'
        'DCGM_FI_DEV_GPU_TEMP{gpu="1",Hostname="n1"} 45\n'
        "# TYPE DCGM_FI_DEV_POWER_USAGE gauge\n"
        'DCGM_FI_DEV_POWER_USAGE{gpu="1",Hostname="n1"} 100.5\n'
    )
    rows = by_index(rows_from_dcgm(parse(text), TS))

    assert rows[0]["uuid"] is None and rows[0]["temp_c"] == 40.0 and rows[0]["power_w"] is None
    assert rows[1]["temp_c"] == 45.0 and rows[1]["power_w"] == 100.5
    assert rows[1]["host"] == "n1"


# --- NVML ------------------------------------------------------------------------------------------


class FakeNVMLError(Exception):
    pass


class FakeNotSupported(FakeNVMLError):
    pass


class FakeNvml:
    """Same names as pynvml; device 0 answers like old pynvml (bytes), device 1 lacks power."""

    NVMLError = FakeNVMLError
    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1

    def __init__(self, *, init_error: str | None = None, count: int = 2) -> None:
        self.init_error = init_error
        self.count = count
        self.init_calls = 0
        self.shutdown_calls = 0

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise FakeNVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUUID(self, h: int) -> bytes | str:
        return b"GPU-11111111-2222-3333-4444-555555555555" if h == 0 else "GPU-66666666-7777"

    def nvmlDeviceGetName(self, h: int) -> bytes | str:
        return b"NVIDIA H100 80GB HBM3" if h == 0 else "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=87, memory=41) if h == 0 else SimpleNamespace(gpu=0, memory=0)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        used = 79110 * MIB if h == 0 else 0
        return SimpleNamespace(total=81559 * MIB, used=used, free=81079 * MIB - used)

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        if h == 1:
            raise FakeNotSupported("Not Supported")
        return 523417

    def nvmlDeviceGetTotalEnergyConsumption(self, h: int) -> int:
        return 987654321098 if h == 0 else 412345678901

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return 61 if h == 0 else 33

    def nvmlDeviceGetClockInfo(self, h: int, clock: int) -> int:
        assert clock == self.NVML_CLOCK_SM
        return 1980 if h == 0 else 345


NVML_GPU0 = {
    "ts_unix_s": TS,
    "source": "nvml",
    "host": "box-1",
    "gpu_index": 0,
    "uuid": "GPU-11111111-2222-3333-4444-555555555555",
    "mig_instance": None,
    "model_name": "NVIDIA H100 80GB HBM3",
    "util_ratio": 0.87,
    "mem_copy_util_ratio": 0.41,
    "fb_used_bytes": 82_952_847_360,
    "fb_free_bytes": 2_064_646_144,
    "power_w": 523.417,
    "energy_j": 987_654_321.098,
    "temp_c": 61.0,
    "sm_clock_mhz": 1980.0,
    "xid_errors": None,
    "gr_engine_active_ratio": None,
    "tensor_active_ratio": None,
    "dram_active_ratio": None,
}


def test_nvml_readings_are_normalised_to_the_dcgm_units() -> None:
    rows = read_nvml(FakeNvml(), TS, "box-1")

    assert rows[0] == NVML_GPU0
    assert rows[1]["uuid"] == "GPU-66666666-7777"
    assert rows[1]["fb_used_bytes"] == 0
    assert rows[1]["energy_j"] == 412_345_678.901


def test_an_nvml_field_that_is_not_supported_stays_none_and_the_rest_is_recorded() -> None:
    row = read_nvml(FakeNvml(), TS, "box-1")[1]

    assert row["power_w"] is None
    assert row["temp_c"] == 33.0 and row["sm_clock_mhz"] == 345.0 and row["util_ratio"] == 0.0


def test_the_collector_writes_nvml_rows_stamped_with_its_clock_and_host() -> None:
    written: list[list[dict[str, Any]]] = []
    fake = FakeNvml()
    collector = GpuCollector(
        written.append, dcgm_url=None, client=None, nvml_module=fake, clock=lambda: TS, host="box-1"
    )

    async def go() -> list[dict[str, Any]]:
        rows = await collector.collect_once()
        await collector.aclose()
        return rows

    rows = asyncio.run(go())

    assert written == [rows]
    assert rows[0] == NVML_GPU0
    assert collector.available is True
    assert (fake.init_calls, fake.shutdown_calls) == (1, 1)


def test_a_gpu_lost_from_the_bus_is_stored_unknown_and_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    class Lost(FakeNvml):
        lost = True

        def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
            if self.lost and i == 1:
                raise FakeNVMLError("GPU is lost")
            return i

    caplog.set_level(logging.DEBUG, logger=LOGGER)
    written: list[list[dict[str, Any]]] = []
    fake = Lost()
    collector = GpuCollector(written.append, dcgm_url=None, client=None, nvml_module=fake, clock=lambda: TS,
                             host="box-1", log=logging.getLogger(LOGGER))

    async def go() -> None:
        for _ in range(2):
            rows = await collector.collect_once()
            assert rows[1]["gpu_index"] == 1 and rows[1]["uuid"] is None and rows[1]["util_ratio"] is None
        fake.lost = False
        await collector.collect_once()
        await collector.aclose()

    asyncio.run(go())
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert warnings == ["NVML gave no reading for GPU 1; those readings are unknown"]
    assert any("recovered" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert len(written) == 3


@pytest.mark.parametrize(
    "fake",
    [FakeNvml(init_error="Driver Not Loaded"), FakeNvml(count=0)],
    ids=["nvmlInit raises", "no devices"],
)
def test_a_host_without_gpus_is_reported_once_and_nothing_is_written(
    fake: FakeNvml, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    written: list[list[dict[str, Any]]] = []
    collector = GpuCollector(
        written.append,
        dcgm_url=None,
        client=None,
        nvml_module=fake,
        host="box-1",
        log=logging.getLogger(LOGGER),
    )

    async def go() -> None:
        assert await collector.collect_once() == []
        assert await collector.collect_once() == []

    asyncio.run(go())

    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1
    assert records[0].levelno == logging.INFO
    assert "no NVIDIA GPU found on this host" in records[0].getMessage()
    assert written == []
    assert collector.available is False
    assert fake.init_calls == 1  # never retried


def test_without_pynvml_installed_the_collector_disables_itself_quietly(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    written: list[list[dict[str, Any]]] = []
    collector = GpuCollector(written.append, host="box-1", log=logging.getLogger(LOGGER))

    assert asyncio.run(collector.collect_once()) == []

    assert collector.available is False
    assert written == []
    assert ["pynvml not importable" in r.getMessage() for r in caplog.records if r.name == LOGGER] == [True]


def test_run_returns_promptly_on_stop_when_the_host_has_no_gpu() -> None:
    collector = GpuCollector(lambda rows: None, nvml_module=FakeNvml(count=0), host="box-1")

    async def go() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(collector.run(stop, interval_s=0.01))
        await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, timeout=1.0)

    asyncio.run(go())
    assert collector.available is False


def test_run_collects_every_interval_until_stopped() -> None:
    written: list[list[dict[str, Any]]] = []
    fake = FakeNvml()
    collector = GpuCollector(written.append, nvml_module=fake, host="box-1")

    async def go() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(collector.run(stop, interval_s=0.01))
        while len(written) < 3:
            await asyncio.sleep(0.005)
        stop.set()
        await asyncio.wait_for(task, timeout=1.0)

    asyncio.run(go())
    assert all(len(rows) == 2 for rows in written)
    assert fake.shutdown_calls == 1


# --- the collector against dcgm-exporter ---------------------------------------------------------


def dcgm_collector(
    handler: Any, written: list[list[dict[str, Any]]]
) -> tuple[GpuCollector, httpx.AsyncClient]:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    collector = GpuCollector(
        written.append,
        dcgm_url="http://dcgm:9400/metrics",
        client=client,
        nvml_module=FakeNvml(init_error="must not be used"),
        clock=lambda: TS,
        host="plane-host",
        log=logging.getLogger(LOGGER),
    )
    return collector, client


def test_the_collector_scrapes_dcgm_exporter_and_writes_its_rows() -> None:
    written: list[list[dict[str, Any]]] = []
    text = fixture_text("dcgm_4.5.2.txt")
    collector, client = dcgm_collector(lambda req: httpx.Response(200, text=text), written)

    async def go() -> list[dict[str, Any]]:
        async with client:
            return await collector.collect_once()

    rows = asyncio.run(go())

    assert written == [rows]
    assert [r["host"] for r in rows] == ["gpu-node-01", "gpu-node-01"]  # the exporter's, not ours
    assert collector.available is True


@pytest.mark.parametrize("failure", ["HTTP 503", "connection refused"])
def test_a_failed_dcgm_scrape_writes_nothing_and_warns(
    failure: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    written: list[list[dict[str, Any]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if failure == "HTTP 503":
            return httpx.Response(503, text="unavailable")
        raise httpx.ConnectError("connection refused", request=request)

    collector, client = dcgm_collector(handler, written)

    async def go() -> list[dict[str, Any]]:
        async with client:
            return await collector.collect_once()

    assert asyncio.run(go()) == []

    assert written == []
    assert collector.available is None  # unknown, not "no GPU"
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "dcgm-exporter scrape failed" in warnings[0].getMessage()


# --- a real GPU, when there is one ---------------------------------------------------------------


@pytest.mark.gpu
def test_real_nvml_readings_are_in_sane_ranges() -> None:
    pynvml = pytest.importorskip("pynvml", reason="pynvml (nvidia-ml-py) not installed")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        pytest.skip(f"no NVIDIA driver / GPU: nvmlInit failed ({exc})")
    try:
        if pynvml.nvmlDeviceGetCount() == 0:
            pytest.skip("NVML reports no GPU")
        rows = read_nvml(pynvml, TS, "this-host")
    finally:
        pynvml.nvmlShutdown()

    assert rows
    for row in rows:
        assert set(row) == set(COLUMNS)
        assert isinstance(row["uuid"], str) and row["uuid"].startswith(("GPU-", "MIG-"))
        assert isinstance(row["model_name"], str) and row["model_name"]
        assert 0.0 <= row["util_ratio"] <= 1.0
        assert 0.0 <= row["mem_copy_util_ratio"] <= 1.0
        assert row["fb_used_bytes"] > 0
        assert row["fb_free_bytes"] >= 0
        assert row["power_w"] > 0
        assert 0 < row["temp_c"] < 120
        assert row["sm_clock_mhz"] > 0


def test_after_a_driver_reload_nvml_is_started_again_not_failing_until_the_plane_restarts() -> None:
    class Reloaded(FakeNvml):
        dead = False  # the driver was reloaded: this NVML session answers Uninitialized for ever

        def nvmlDeviceGetCount(self) -> int:
            if self.dead:
                raise FakeNVMLError("Uninitialized")
            return self.count

        def nvmlInit(self) -> None:
            super().nvmlInit()
            self.dead = False

    fake = Reloaded()
    written: list[list[dict[str, Any]]] = []
    collector = GpuCollector(written.append, dcgm_url=None, client=None, nvml_module=fake, clock=lambda: TS,
                             host="box-1")

    async def go() -> list[int]:
        counts = [len(await collector.collect_once())]
        fake.dead = True
        counts.append(len(await collector.collect_once()))  # that round's readings are unknown: no rows
        fake.init_error = "Driver Not Loaded"  # still reloading: unknown again, and not given up
        counts.append(len(await collector.collect_once()))
        fake.init_error = None
        counts.append(len(await collector.collect_once()))  # started again
        await collector.aclose()
        return counts

    assert asyncio.run(go()) == [2, 0, 0, 2]
    assert collector.available is True and fake.init_calls == 3


def test_an_infinite_or_negative_dcgm_reading_is_unknown_and_the_gpus_other_fields_stay() -> None:
    labels = 'gpu="0",UUID="GPU-a",Hostname="n1",modelName="NVIDIA H100 80GB HBM3"'
    text = (f"DCGM_FI_DEV_POWER_USAGE{{{labels}}} +Inf\n"
            f"DCGM_FI_DEV_GPU_UTIL{{{labels}}} -1\n"
            f"DCGM_FI_DEV_GPU_TEMP{{{labels}}} 61\n"
            f"DCGM_FI_DEV_FB_USED{{{labels}}} 1024\n")
    (row,) = rows_from_dcgm(parse(text), TS)
    assert row["power_w"] is None and row["util_ratio"] is None  # were stored as inf W and -1 %
    assert row["temp_c"] == 61 and row["fb_used_bytes"] == 1024 * 2**20

