"""The real Prometheus (Debian's package) scraping a real vLLM and the plane, with the generated rules loaded.

One Prometheus on a free loopback port scrapes every second: the session's real vLLM (labelled deployment `tiny`,
replica `tiny-0`, as deploy/prometheus.yml does), the session's plane, and a second plane started here with the
example SLOs and an external deployment `tiny` pointing at the same vLLM, so that the plane exports its replica,
SLO, cost and tuner series. Then: a recording rule returns data, every rule group is loaded and healthy, every
dashboard query runs without error (and the fleet's core panels have data), and every metric name the dashboards
read is exposed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from controlplane import names
from controlplane.grafana.dashboards import dashboards
from controlplane.slo.options import RuleOptions
from tests.conftest import free_port
from tests.integration.conftest import RealVllm
from tests.tools.conftest import prometheus_tools  # noqa: F401 - the fixture that installs Debian's prometheus
from tests.unit.grafana.exposition import exposed_names

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[2]
RULE_FILES = sorted((REPO / "alerts" / "rules").glob("*.yaml"))
DASHBOARD_FILES = sorted((REPO / "dashboards" / "grafana" / "dashboards").glob("*.json"))
DEPLOYMENT = "tiny"  # the deployment of alerts/slos
RECORDED = 'controlplane_slo:requests:rate5m{slo="tiny-errors"}'  # sum(rate(vllm:request_success_total[5m]))
VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
# Wide windows: the requests of this module must stay inside them for every test that reads them.
BUILTINS = {"__rate_interval": "10m", "__range": "10m", "__interval": "1s"}


@dataclass(frozen=True)
class Stack:
    prometheus: str
    plane_api: str
    vllm: RealVllm


def _wait(what: str, check: Any, timeout_s: float, proc: subprocess.Popen[bytes] | None = None,
          log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited ({proc.returncode}): {log.read_text() if log else ''}")
        try:
            last = check()
            if last:
                return last
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout_s:.0f} s (last: {last!r})"
                         + (f"\n{log.read_text()[-3000:]}" if log else ""))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _start_slo_plane(tmp: Path, vllm_url: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    """`controlplane up` with the example SLOs and the real vLLM as the external deployment `tiny`."""
    tmp.mkdir(parents=True, exist_ok=True)
    spec = tmp / "deployment.yaml"
    spec.write_text(yaml.safe_dump({"apiVersion": "controlplane/v1", "kind": "Deployment",
                                    "metadata": {"name": DEPLOYMENT},
                                    "spec": {"model": {"path": "external", "served_name": "tiny"},
                                             "hardware": {"price_per_hour_usd": 1.0},
                                             "backend": {"kind": "external", "urls": [vllm_url]}}}))
    api_port = free_port()
    env = {**os.environ, "CONTROLPLANE_DATA_DIR": str(tmp), "CONTROLPLANE_API_PORT": str(api_port),
           "CONTROLPLANE_OTLP_HTTP_PORT": str(free_port()), "CONTROLPLANE_OTLP_GRPC_PORT": str(free_port()),
           "CONTROLPLANE_ROUTER_PORT": str(free_port()), "CONTROLPLANE_SCRAPE_INTERVAL_S": "5",
           "CONTROLPLANE_SLO_INTERVAL_S": "2"}
    argv = ["nice", "-n", "10", str(Path(sys.executable).parent / "controlplane"), "up", "--config", str(spec),
            "--slo", str(REPO / "alerts" / "slos")]
    log = tmp / "plane.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{api_port}"
    try:
        _wait("the SLO plane answers /healthz", lambda: httpx.get(api + "/healthz", timeout=1).status_code == 200,
              60, proc, log)
    except BaseException:
        _stop(proc)
        raise
    return proc, api, log


def _hostport(url: str) -> str:
    return urlsplit(url).netloc


def _prometheus_config(vllm: RealVllm, slo_plane_api: str) -> dict[str, Any]:
    job = {"scrape_interval": "1s", "scrape_timeout": "1s"}
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in RULE_FILES],
        "scrape_configs": [
            {"job_name": "vllm", **job, "static_configs": [
                {"targets": [_hostport(vllm.base_url)], "labels": {"deployment": DEPLOYMENT, "replica": "tiny-0"}}]},
            {"job_name": "controlplane", **job, "static_configs": [{"targets": [_hostport(slo_plane_api)]}]},
            {"job_name": "controlplane-session", **job, "static_configs": [{"targets": [_hostport(vllm.plane.api)]}]},
        ],
    }


@pytest.fixture(scope="module")
def stack(real_vllm: RealVllm, prometheus_tools: dict[str, str],  # noqa: F811 - the imported fixture
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    binary = shutil.which("prometheus")
    assert binary, "Debian's prometheus package installs /usr/bin/prometheus with promtool"
    tmp = tmp_path_factory.mktemp("prometheus-real")
    plane, api, _ = _start_slo_plane(tmp / "plane", real_vllm.base_url)
    prom: subprocess.Popen[bytes] | None = None
    try:
        config = tmp / "prometheus.yml"
        config.write_text(yaml.safe_dump(_prometheus_config(real_vllm, api), sort_keys=False))
        check = subprocess.run([prometheus_tools["promtool"], "check", "config", str(config)], capture_output=True,
                               text=True, timeout=120)
        assert check.returncode == 0, check.stdout + check.stderr
        port = free_port()
        log = tmp / "prometheus.log"
        with log.open("ab") as out:
            prom = subprocess.Popen(
                ["nice", "-n", "10", binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        _wait("Prometheus ready", lambda: httpx.get(url + "/-/ready", timeout=1).status_code == 200, 60, prom, log)
        yield Stack(url, api, real_vllm)
    finally:
        if prom is not None:
            _stop(prom)
        _stop(plane)


def query(prometheus: str, expr: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(prometheus + "/api/v1/query", params={"query": expr}, timeout=10).json()
    return body


def values(prometheus: str, expr: str) -> list[float]:
    body = query(prometheus, expr)
    assert body["status"] == "success", body
    return [float(r["value"][1]) for r in body["data"]["result"]]


@pytest.fixture(scope="module")
def traffic(stack: Stack) -> Stack:
    """A few real requests, sent once every target has been scraped at least twice (a baseline for rate())."""
    p = stack.prometheus
    _wait("all targets up twice", lambda: values(p, "min(count_over_time(up[1m])) >= 2") and
          values(p, "min(up)") == [1.0], 60)
    for i in range(6):
        r = httpx.post(stack.vllm.base_url + "/v1/completions", timeout=120, json={
            "model": stack.vllm.model, "prompt": f"request {i} for the real Prometheus test", "max_tokens": 8,
            "ignore_eos": True, "temperature": 0})
        assert r.status_code == 200, r.text
    return stack


def test_a_recording_rule_returns_data_from_the_real_vllm(traffic: Stack) -> None:
    got = _wait(f"{RECORDED} > 0", lambda: [v for v in values(traffic.prometheus, RECORDED) if v > 0], 90)
    # Six requests (and any of earlier tests in the session after Prometheus' first scrape) over a 5-minute window.
    assert len(got) == 1 and 0 < got[0] < 1


def test_every_generated_rule_group_is_loaded_and_healthy(traffic: Stack) -> None:
    expected = {g["name"]: g for p in RULE_FILES for g in yaml.safe_load(p.read_text())["groups"]}

    def loaded() -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = httpx.get(traffic.prometheus + "/api/v1/rules", timeout=10).json()[
            "data"]["groups"]
        every_second = [r for g in groups if g["interval"] == 1 for r in g["rules"]]
        return groups if every_second and all(r["health"] == "ok" for r in every_second) else []

    groups = _wait("every 1 s rule evaluated ok", loaded, 60)
    assert {g["name"] for g in groups} == set(expected)
    for g in groups:
        assert len(g["rules"]) == len(expected[g["name"]]["rules"]), g["name"]
        for rule in g["rules"]:
            # Groups with their own interval (the 5 m error-budget groups) may not have run yet: unknown, never err.
            assert rule["health"] in (("ok",) if g["interval"] == 1 else ("ok", "unknown")), (g["name"], rule)
            assert not rule.get("lastError"), (g["name"], rule)


def _substitute(expr: str) -> str:
    return VAR.sub(lambda m: BUILTINS.get(m.group(1) or m.group(2), ".*"), expr)


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_every_dashboard_query_runs_on_the_real_prometheus(traffic: Stack, path: Path) -> None:
    _wait("the recording rule", lambda: values(traffic.prometheus, RECORDED), 90)
    data = json.loads(path.read_text())
    for panel in (p for p in data["panels"] if p["type"] != "row"):
        for target in panel["targets"]:
            body = query(traffic.prometheus, _substitute(target["expr"]))
            assert body["status"] == "success", (panel["title"], target["expr"], body)


@pytest.mark.parametrize("title", ["Requests/s", "Running", "Time to first token", "Time per output token",
                                   "End-to-end latency", "Tokens/s", "KV cache usage", "Prefix cache hit ratio"])
def test_the_fleet_dashboards_core_panels_have_data(traffic: Stack, title: str) -> None:
    _wait("the recording rule", lambda: values(traffic.prometheus, RECORDED), 90)
    data = json.loads((REPO / "dashboards/grafana/dashboards/vllm-fleet.json").read_text())
    panel = next(p for p in data["panels"] if p["title"] == title)
    for target in panel["targets"]:
        got = _wait(f"{title}: {target['expr']}", lambda t=target: values(traffic.prometheus, _substitute(t["expr"])),
                    30)
        assert all(v == v for v in got), (title, got)  # no NaN: the histograms have counts


def test_the_deployment_variable_lists_the_deployment(traffic: Stack) -> None:
    r = httpx.get(traffic.prometheus + "/api/v1/label/deployment/values", timeout=10,
                  params={"match[]": names.VLLM_NUM_RUNNING}).json()
    assert r["data"] == [DEPLOYMENT]


def _exposed(stack: Stack) -> tuple[set[str], set[str]]:
    vllm = exposed_names(httpx.get(stack.vllm.base_url + "/metrics", timeout=10).text)
    plane = set()
    for api in (stack.plane_api, stack.vllm.plane.api):
        plane |= exposed_names(httpx.get(api + "/metrics", timeout=10).text)
    return vllm, plane


def _used(prefix: str) -> set[str]:
    return {n for spec in dashboards(RuleOptions()) for n in spec.metric_names() if n.startswith(prefix)}


def test_every_vllm_metric_the_dashboards_read_is_exposed_by_the_real_vllm(stack: Stack) -> None:
    vllm, _ = _exposed(stack)
    wanted = _used(names.VLLM_PREFIX)
    assert len(wanted) >= 14 and wanted - vllm == set()


# Exposed only by a plane whose router served at least 100 inference requests that ended 30 s to 5.5 min ago; this
# plane only watches vLLM. tests/integration/test_closed_loop.py reads it from a real plane's /metrics, and
# tests/unit/grafana/test_metric_names.py checks the collector's name.
ROUTED_ONLY = {names.PLANE_SPAN_COVERAGE}
# Exposed by the simulated engine (it marks itself), not the plane; tests/unit/grafana/test_metric_names.py renders
# the simulated engine's metrics to check the name.
SIMULATED_ONLY = {names.SIM_ENGINE_INFO}


def test_every_plane_metric_the_dashboards_read_is_exposed_by_the_real_plane(traffic: Stack) -> None:
    """After traffic: the cost series exist only for a deployment with tokens in the plane's cost window (a figure
    that is unknown is left out, not exported as 0), and the plane scrapes vLLM every 5 s."""
    wanted = _used("controlplane_") - ROUTED_ONLY - SIMULATED_ONLY
    assert len(wanted) >= 15
    deadline = time.monotonic() + 60
    while (missing := wanted - _exposed(traffic)[1]) and time.monotonic() < deadline:
        time.sleep(1)
    assert missing == set()
