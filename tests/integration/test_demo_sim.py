"""`controlplane demo --engine sim`, the newcomer's command, run end to end as a process: the plane starts a
simulated fleet, the Streamlit app answers, the burst pages, the tuner adds a replica, attainment recovers, the
report is written with its plots, and nothing is left running. About two minutes; no vLLM needed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psutil

from tests.integration.fleet import consecutive_free_ports, vllm_processes


def test_the_sim_demo_pages_scales_recovers_and_writes_its_report(tmp_path: Path) -> None:
    # Ports below the kernel's ephemeral range: the app binds its port a minute after this pick, while the
    # plane opens many outgoing connections. The gRPC port marks the plane's replicas (their spans endpoint).
    base = consecutive_free_ports(5)
    api, router, otlp_http, grpc, ui = range(base, base + 5)
    env = {**os.environ, "CONTROLPLANE_DATA_DIR": str(tmp_path), "CONTROLPLANE_API_PORT": str(api),
           "CONTROLPLANE_ROUTER_PORT": str(router), "CONTROLPLANE_OTLP_HTTP_PORT": str(otlp_http),
           "CONTROLPLANE_OTLP_GRPC_PORT": str(grpc), "CONTROLPLANE_UI_PORT": str(ui),
           "COLUMNS": "400"}  # rich wraps at 80 columns without a terminal; paths stay on one line
    env.pop("CONTROLPLANE_API_TOKEN", None)  # the demo makes its own
    markers = (str(tmp_path), f"127.0.0.1:{grpc}", f"--server.port {ui}")  # the plane, its replicas, the app
    exe = str(Path(sys.executable).parent / "controlplane")
    proc = subprocess.Popen([exe, "demo", "--engine", "sim"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"the demo ran past 420 s; its output:\n{out[-4000:]}") from None
    finally:
        left = {p.pid: " ".join(p.info["cmdline"] or [])[:160] for m in markers for p in vllm_processes(m)}
        for pid in left:  # whatever outlived the demo must not outlive the test
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
    assert proc.returncode == 0, out[-4000:]
    assert left == {}, f"still running after the demo: {left}"

    assert f"✓ Streamlit app: http://127.0.0.1:{ui}" in out  # it answered its health check
    assert "✓ the plane paged, the tuner added a replica, and attainment recovered" in out
    assert re.search(r"page fired: \+\d+ s; tuner's scale-up applied: \+\d+ s", out), out[-2000:]

    runs = list((tmp_path / "demo").iterdir())
    assert len(runs) == 1
    report = runs[0] / "report.md"
    assert f"report: {report}" in out
    text = report.read_text()
    pngs = re.findall(r"\]\(([^)]+\.png)\)", text)
    assert {"ttft.png", "kv.png", "replicas.png"} <= {Path(p).name for p in pngs}, text[:1000]
    for p in pngs:
        assert (runs[0] / p).stat().st_size > 5_000  # a drawn plot, not an empty file
    assert "simulated" in text  # the report says the fleet was simulated
