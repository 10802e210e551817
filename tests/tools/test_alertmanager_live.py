"""Live alerting against a real Alertmanager (Debian's prometheus-alertmanager) with a webhook receiver.

Requests in the store burn the TTFT SLO's budget; the plane's alerter pages through Alertmanager, the
ticket of the same SLO is inhibited by the page, and when the short window recovers the page resolves.
Alertmanager runs the generated configuration (alerts/alertmanager.yml's structure) with webhook URLs
and short group timings.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from controlplane.slo.alerter import Alerter, list_alerts
from controlplane.slo.alertmanager import alertmanager_config
from controlplane.slo.monitor import SloMonitor
from controlplane.slo.options import RuleOptions
from controlplane.slo.spec import load_slos
from controlplane.store.db import make_engine, upgrade
from controlplane.store.repo import Store
from tests.conftest import free_port

SLOS = """
apiVersion: controlplane/v1
kind: SLO
metadata: {name: live-ttft}
spec: {deployment: live, sli: ttft, threshold: 500ms, objective: 0.99, window: 30d}
"""


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    server.shutdown()


@pytest.fixture
def alertmanager(tmp_path: Path, webhook: tuple[str, list[dict[str, Any]]],
                 prometheus_tools: dict[str, str]) -> Iterator[str]:
    binary = prometheus_tools["prometheus-alertmanager"]
    cfg = alertmanager_config(RuleOptions(page_webhook_url=webhook[0], ticket_webhook_url=webhook[0]))
    # Production timings are minutes; a test waits seconds.
    cfg["route"].update(group_wait="1s", group_interval="1s")
    for r in cfg["route"]["routes"]:
        r.update(group_wait="1s", group_interval="1s")
    (tmp_path / "am.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'am.yml'}", f"--storage.path={tmp_path / 'am'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                            stdout=subprocess.DEVNULL, stderr=(tmp_path / "am.log").open("wb"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError(f"alertmanager not ready: {(tmp_path / 'am.log').read_text()[-2000:]}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(tmp_path / "am", ignore_errors=True)


def _rows(start: float, end: float, every_s: float, ttft_s: float) -> list[dict[str, Any]]:
    out, t, i = [], start, 0
    while t < end:
        out.append({"replica": "live-0", "request_id": f"r{start}-{i}", "arrival_unix_s": t, "ttft_s": ttft_s,
                    "e2e_s": ttft_s + 1.0, "tpot_s": 0.02, "prompt_tokens": 10, "completion_tokens": 20,
                    "trace_id": f"{int(t * 1000):032x}", "span_id": f"{i:016x}"})
        t += every_s
        i += 1
    return out


def _wait_for(received: list[dict[str, Any]], status: str, timeout_s: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for n in received:
            if n["status"] == status:
                return n
        time.sleep(0.2)
    raise AssertionError(f"no {status} notification in {timeout_s} s; got {received}")


def test_a_burning_slo_pages_through_alertmanager_inhibits_its_ticket_and_resolves(
        tmp_path: Path, alertmanager: str, webhook: tuple[str, list[dict[str, Any]]]) -> None:
    _, received = webhook
    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    upgrade(engine)
    store = Store(engine)
    dep_id = store.save_deployment("live", model="m", spec={}, desired_replicas=1, engine_config={})
    store.save_replica("live-0", deployment_id=dep_id, url=None, backend="external", state="ready", runtime=None,
                       config=None)
    slos = load_slos(SLOS)
    monitor = SloMonitor(engine, slos)
    alerter = Alerter(engine, alertmanager_url=alertmanager, resend_s=5)

    now = time.time()
    t0 = now - 2400  # the first evaluation happens "40 minutes ago"; the second one now
    # An hour of requests all slower than the 500 ms target: every burn window is far above its threshold.
    store.write_spans(_rows(t0 - 3600, t0, 10, ttft_s=2.0), [])
    _, statuses = monitor.tick(t0)
    changes = alerter.evaluate(statuses, t0)
    assert sorted((e.severity, t) for e, t in changes) == [("page", "firing"), ("ticket", "firing")]

    page = _wait_for(received, "firing")
    assert page["groupLabels"] == {"alertname": "VllmSloErrorBudgetBurnPage", "deployment": "live",
                                   "slo": "live-ttft"}
    assert [a["labels"]["severity"] for a in page["alerts"]] == ["page"]
    assert page["alerts"][0]["annotations"]["runbook_url"].endswith("#vllmsloerrorbudgetburnpage")
    # The ticket goes out in the next round, once Alertmanager holds the page that inhibits it.
    _, statuses = monitor.tick(t0 + 30)
    assert alerter.evaluate(statuses, t0 + 30) == []
    time.sleep(3)  # a few group intervals: the ticket of the same SLO stays silenced by the page
    assert all(a["labels"]["severity"] == "page" for n in received for a in n["alerts"])
    silenced = httpx.get(alertmanager + "/api/v2/alerts", params={"inhibited": "true"}).json()
    assert any(a["labels"]["severity"] == "ticket" and a["status"]["inhibitedBy"] for a in silenced)

    # The next 40 minutes are fast: the short windows of both page tiers (5 m, 30 m) recover, while the ticket
    # tiers' 2 h / 6 h short windows still hold the slow hour. The page keeps firing for its keep_firing_for (the
    # shortest short window, 5 m) after the first round that finds it clear, then resolves.
    store.write_spans(_rows(t0 + 1, now, 5, ttft_s=0.05), [])
    _, statuses = monitor.tick(now - 300)
    assert alerter.evaluate(statuses, now - 300) == []  # clear, kept firing
    assert alerter.states()["live-ttft"]["page"] == 2
    _, statuses = monitor.tick(now)
    changes = alerter.evaluate(statuses, now)
    assert [(e.severity, t) for e, t in changes] == [("page", "resolved")]
    resolved = _wait_for(received, "resolved")
    assert resolved["groupLabels"]["slo"] == "live-ttft"
    episodes = {r["severity"]: r for r in list_alerts(engine)}
    assert episodes["page"]["state"] == "resolved" and episodes["page"]["fired_unix_s"] == t0
    assert episodes["page"]["resolved_unix_s"] == now and episodes["page"]["notified_unix_s"] is not None
