"""The rendered alerts/ checked by the real tools: promtool check rules, amtool check-config, every generated
promtool unit test, a mutated expectation that promtool must reject, and Alertmanager's own inhibition.
Plus the staleness check: the committed files are exactly what the specs render."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import yaml

from controlplane import names
from controlplane.grafana.dashboards import tuner
from controlplane.slo.options import RuleOptions
from controlplane.slo.render import build, stale
from controlplane.slo.rules import slo_rules
from tests.conftest import free_port
from tests.unit.slo.rule_factories import make_slo

REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "alerts"
TEST_FILES = sorted((ALERTS / "tests").glob("*.test.yaml"))


def test_the_committed_alerts_are_what_the_specs_render() -> None:
    problems = stale([ALERTS / "slos"], ALERTS)
    assert not problems, "alerts/ is stale; run `controlplane slo render`:\n" + "\n".join(problems)


def run(*args: str, cwd: Path = ALERTS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=600)


def test_promtool_accepts_every_rendered_rule_file(prometheus_tools: dict[str, str]) -> None:
    files = sorted(str(p.relative_to(ALERTS)) for p in (ALERTS / "rules").glob("*.yaml"))
    result = run(prometheus_tools["promtool"], "check", "rules", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(files) >= 6


def test_amtool_accepts_the_rendered_alertmanager_config(prometheus_tools: dict[str, str]) -> None:
    result = run(prometheus_tools["amtool"], "check-config", "alertmanager.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 inhibit rules" in result.stdout and "3 receivers" in result.stdout


@pytest.mark.parametrize(("labels", "receiver"), [
    ("severity=page", "controlplane-page"), ("severity=ticket", "controlplane-ticket"),
    ("foo=bar", "controlplane-default"),
])
def test_amtool_routes_pages_and_tickets_to_their_receivers(prometheus_tools: dict[str, str], labels: str,
                                                            receiver: str) -> None:
    result = run(prometheus_tools["amtool"], "config", "routes", "test", "--config.file=alertmanager.yml", labels)
    assert result.returncode == 0 and result.stdout.strip() == receiver, result.stdout + result.stderr


@pytest.fixture(scope="module")
def promtool_results(prometheus_tools: dict[str, str]) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every generated unit-test file through `promtool test rules`, two at a time (each takes a few seconds)."""
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        results = pool.map(lambda p: run(prometheus_tools["promtool"], "test", "rules", str(p.relative_to(ALERTS))),
                           TEST_FILES)
        return {p.name: r for p, r in zip(TEST_FILES, results, strict=True)}


def test_there_is_a_unit_test_file_for_every_tier_and_guard() -> None:
    names_ = {p.name for p in TEST_FILES}
    assert {"slo-tiny-errors.page-14.4x-1h.test.yaml", "slo-tiny-errors.page-6x-6h.test.yaml",
            "slo-tiny-errors.ticket-3x-1d.test.yaml", "slo-tiny-errors.ticket-1x-3d.test.yaml",
            "operational.test.yaml"} <= names_
    assert {f"slo-tiny-{s}.guards.test.yaml" for s in ("ttft", "tpot", "goodput", "errors")} <= names_


@pytest.mark.parametrize("name", [p.name for p in TEST_FILES])
def test_promtool_unit_tests_pass(promtool_results: dict[str, subprocess.CompletedProcess[str]], name: str) -> None:
    result = promtool_results[name]
    assert result.returncode == 0 and "SUCCESS" in result.stdout, (result.stdout + result.stderr)[-4000:]


def test_promtool_rejects_a_page_expected_one_tick_early(prometheus_tools: dict[str, str], tmp_path: Path) -> None:
    """The generated tests have teeth: move the 14.4x page's expected fire time one tick earlier and promtool fails."""
    source = ALERTS / "tests" / "slo-tiny-errors.page-14.4x-1h.test.yaml"
    data = yaml.safe_load(source.read_text())
    data["rule_files"] = [str(ALERTS / "rules" / "slo-tiny-errors.rules.yaml")]
    checks = [c for c in data["tests"][0]["alert_rule_test"] if c["alertname"] == names.ALERT_SLO_BURN_PAGE]
    before, at = checks[0], checks[1]
    before["exp_alerts"] = at["exp_alerts"]  # claim the page already fires one tick before the workbook time
    mutated = tmp_path / "mutated.test.yaml"
    mutated.write_text(yaml.safe_dump(data, sort_keys=False))
    result = run(prometheus_tools["promtool"], "test", "rules", str(mutated), cwd=tmp_path)
    assert result.returncode != 0 and "FAILED" in result.stdout + result.stderr


@pytest.mark.parametrize(("mutation", "why"), [
    (lambda e: re.sub(r"^\((.*)\) or \(.*ALERTS.*$", r"\1", e), "without the hold, the gap resolves the page"),
    (lambda e: re.sub(r" and on \(\) ALERTS\{[^}]*\}", "", e), "without its own ALERTS, a gap starts the page"),
], ids=["no-hold", "hold-without-alerts"])
def test_promtool_rejects_the_burn_rule_without_its_hold(prometheus_tools: dict[str, str], tmp_path: Path,
                                                         mutation: Callable[[str], str], why: str) -> None:
    """The hold case has teeth: each half of the rule's second branch is needed for it to pass."""
    rules = yaml.safe_load((ALERTS / "rules" / "slo-tiny-errors.rules.yaml").read_text())
    changed = 0
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == names.ALERT_SLO_BURN_PAGE:
                mutated = mutation(rule["expr"])
                changed += mutated != rule["expr"]
                rule["expr"] = mutated
    assert changed == 2, why  # both page tiers
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    data = yaml.safe_load((ALERTS / "tests" / "slo-tiny-errors.page-14.4x-1h.test.yaml").read_text())
    data["rule_files"] = ["rules.yaml"]
    (tmp_path / "hold.test.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    result = run(prometheus_tools["promtool"], "test", "rules", "hold.test.yaml", cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode != 0 and "FAILED" in out, why
    assert "the page holds" in out, out  # the hold case failed, not the tier case before it


@pytest.fixture
def alertmanager(prometheus_tools: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """The real Alertmanager on the rendered config, on a free loopback port, without clustering."""
    port = free_port()
    proc = subprocess.Popen(
        [prometheus_tools["prometheus-alertmanager"], f"--config.file={ALERTS / 'alertmanager.yml'}",
         f"--storage.path={tmp_path}", f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                pytest.fail(f"alertmanager exited: {proc.stderr.read() if proc.stderr else ''}")
            time.sleep(0.1)
        else:
            pytest.fail("alertmanager did not become ready in 10 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _alert(name: str, slo: str, severity: str) -> dict[str, object]:
    return {"labels": {"alertname": name, "slo": slo, "deployment": "tiny", "severity": severity},
            "startsAt": datetime.now(UTC).isoformat()}


def test_alertmanager_suppresses_the_ticket_of_a_paging_slo_and_no_other(alertmanager: str) -> None:
    page, ticket = names.ALERT_SLO_BURN_PAGE, names.ALERT_SLO_BURN_TICKET
    sent = [_alert(page, "tiny-ttft", "page"), _alert(ticket, "tiny-ttft", "ticket"),
            _alert(ticket, "tiny-tpot", "ticket"), _alert(names.ALERT_REPLICA_DOWN, "", "ticket")]
    assert httpx.post(f"{alertmanager}/api/v2/alerts", json=sent, timeout=5).status_code == 200
    states: dict[tuple[str, str], str] = {}
    for _ in range(50):  # inhibition is computed asynchronously right after the alerts arrive
        got = httpx.get(f"{alertmanager}/api/v2/alerts", timeout=5).json()
        states = {(a["labels"]["alertname"], a["labels"].get("slo", "")): a["status"]["state"] for a in got}
        if len(states) == 4 and states.get((ticket, "tiny-ttft")) == "suppressed":
            break
        time.sleep(0.1)
    assert states == {(page, "tiny-ttft"): "active", (ticket, "tiny-ttft"): "suppressed",
                      (ticket, "tiny-tpot"): "active", (names.ALERT_REPLICA_DOWN, ""): "active"}, json.dumps(states)


def test_a_one_hour_slo_pages_at_a_15_s_scrape_because_its_windows_are_widened(prometheus_tools: dict[str, str],
                                                                               tmp_path: Path) -> None:
    """A 1-hour window scales the 14.4x tier to 12 s / 1 s windows: rate() over them is empty at any real scrape
    interval, so the page could never fire (this test fails so when rendered without the widening). Rendered for
    a 15 s scrape they are 12m / 1m; with every request bad, scraped every 15 s, it pages within minutes. The whole
    render (rules, generated promtool tests, runbooks) goes through too."""
    slo = make_slo("hour", objective=0.99, window_days=1 / 24, ticket=False)
    rules = slo_rules([slo], RuleOptions(scrape_interval_s=15.0))
    assert any("hold fewer than 4 scrapes at 15s; the Prometheus rules use 12m/1m" in w for w in rules.warnings)
    files, _ = build([slo], RuleOptions(scrape_interval_s=15.0))
    assert "rules/slo-hour.rules.yaml" in files
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules.to_dict()))
    hist, labels = names.VLLM_TTFT_HIST, '{deployment="tiny", le="%s"}'
    test = {"rule_files": ["rules.yaml"], "evaluation_interval": "15s", "tests": [{
        "interval": "15s",
        "input_series": [  # 2 requests/s, every one over the 1 s threshold
            {"series": f"{hist}_bucket" + labels % "1.0", "values": "0+0x80"},
            {"series": f"{hist}_bucket" + labels % "+Inf", "values": "0+30x80"},
            {"series": f"{hist}_count" + '{deployment="tiny"}', "values": "0+30x80"},
        ],
        "promql_expr_test": [{
            "expr": f'count(ALERTS{{alertname="{names.ALERT_SLO_BURN_PAGE}", alertstate="firing", '
                    f'burn_rate="14.4"}})',
            "eval_time": "15m", "exp_samples": [{"labels": "{}", "value": 1}]}],
    }]}
    (tmp_path / "hour.test.yaml").write_text(yaml.safe_dump(test))
    result = run(prometheus_tools["promtool"], "test", "rules", "hour.test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_slo_whose_series_are_absent_gets_a_no_data_ticket_unless_scaled_to_zero(
        prometheus_tools: dict[str, str], tmp_path: Path) -> None:
    """Replicas scraped without a `deployment` label (or not at all): every burn rule of the SLO is empty and no page
    can fire, so the no-data ticket must, also while the plane reports a replica ready. Not while the plane reports
    the deployment scaled to 0, or its replicas still starting (a long model load serves no /metrics)."""
    hist = names.VLLM_TTFT_HIST
    no_data = f'count(ALERTS{{alertname="{names.ALERT_SLO_NO_DATA}", alertstate="firing", slo="tiny-ttft"}})'
    burn_page = f'count(ALERTS{{alertname="{names.ALERT_SLO_BURN_PAGE}", slo="tiny-ttft"}})'

    def case(series: list[dict[str, str]], fires: bool) -> dict[str, object]:
        return {"interval": "15s", "input_series": series, "promql_expr_test": [
            {"expr": no_data, "eval_time": "11m", "exp_samples": [{"labels": "{}", "value": 1}] if fires else []},
            {"expr": burn_page, "eval_time": "11m", "exp_samples": []}]}

    unlabelled = [{"series": f'{hist}_count{{replica="tiny-0"}}', "values": "0+30x60"},  # every request bad
                  {"series": f'{hist}_bucket{{replica="tiny-0", le="+Inf"}}', "values": "0+30x60"}]
    labelled = [{"series": f'{hist}_count{{deployment="tiny", replica="tiny-0"}}', "values": "0+30x60"}]
    scaled_to_zero = [{"series": f'{names.PLANE_DESIRED_REPLICAS}{{deployment="tiny"}}', "values": "0x60"}]
    starting = [{"series": f'{names.PLANE_DESIRED_REPLICAS}{{deployment="tiny"}}', "values": "1x60"},
                {"series": f'{names.PLANE_REPLICA_UP}{{deployment="tiny", replica="tiny-0"}}', "values": "0x60"}]
    serving = [{"series": f'{names.PLANE_DESIRED_REPLICAS}{{deployment="tiny"}}', "values": "1x60"},
               {"series": f'{names.PLANE_REPLICA_UP}{{deployment="tiny", replica="tiny-0"}}', "values": "1x60"},
               *unlabelled]
    test = {"rule_files": [str(ALERTS / "rules" / "slo-tiny-ttft.rules.yaml")], "evaluation_interval": "15s",
            "tests": [case(unlabelled, True), case(labelled, False), case(scaled_to_zero, False),
                      case(starting, False), case(serving, True)]}
    (tmp_path / "nodata.test.yaml").write_text(yaml.safe_dump(test))
    result = run(prometheus_tools["promtool"], "test", "rules", "nodata.test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_held_page_resolves_once_the_deployment_is_scaled_to_zero_not_while_replicas_are_wanted(
        prometheus_tools: dict[str, str], tmp_path: Path) -> None:
    """Every request bad for an hour, then none finishes. With replicas still wanted (a hung engine) the page holds on
    the long window's evidence; scaled to 0 on purpose, nothing can finish, and the page resolves (after its
    keep_firing_for) instead of firing for the rest of the long window (hours for the 6x tier)."""
    hist = names.VLLM_TTFT_HIST
    page = (f'count(ALERTS{{alertname="{names.ALERT_SLO_BURN_PAGE}", alertstate="firing", slo="tiny-ttft", '
            'burn_rate="14.4"})')
    traffic = [{"series": f'{hist}_count{{deployment="tiny", replica="tiny-0"}}', "values": "0+60x60 stale"},
               {"series": f'{hist}_bucket{{deployment="tiny", replica="tiny-0", le="0.5"}}', "values": "0+0x60 stale"}]

    def case(desired_after: int, fires: bool) -> dict[str, object]:
        desired = {"series": f'{names.PLANE_DESIRED_REPLICAS}{{deployment="tiny"}}',
                   "values": f"1x60 {desired_after}x60"}
        return {"interval": "1m", "input_series": [*traffic, desired], "promql_expr_test": [
            {"expr": page, "eval_time": "59m", "exp_samples": [{"labels": "{}", "value": 1}]},
            {"expr": page, "eval_time": "80m", "exp_samples": [{"labels": "{}", "value": 1}] if fires else []}]}

    test = {"rule_files": [str(ALERTS / "rules" / "slo-tiny-ttft.rules.yaml")], "evaluation_interval": "1m",
            "tests": [case(1, True), case(0, False)]}
    (tmp_path / "zero.test.yaml").write_text(yaml.safe_dump(test))
    result = run(prometheus_tools["promtool"], "test", "rules", "zero.test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_bar_panel_counts_each_event_in_exactly_one_bar(prometheus_tools: dict[str, str], tmp_path: Path) -> None:
    """The tuner dashboard's Restarts bars at 20 s steps: a restart scraped between two steps' windows (at 25 s)
    lands in one bar (increase over the step's own 20 s missed it; over $__rate_interval it landed in several),
    and a replica whose counter first appears mid-range (at 60 s) counts whole, in its bar only."""
    (restarts,) = [p for row in tuner(RuleOptions()).rows for p in row.panels if p.title == "Restarts"]
    expr = (restarts.queries[0].expr.render().replace("$__interval", "20s")
            .replace('=~"$deployment"', '=~".*"').replace('=~"$replica"', '=~".*"'))
    metric = names.PLANE_REPLICA_RESTARTS_TOTAL

    def bar(replica: str, t: int, value: int) -> dict[str, object]:
        return {"expr": f'({expr}) and on(replica) {metric}{{replica="{replica}"}}', "eval_time": f"{t}s",
                "exp_samples": [{"labels": f'{{deployment="tiny", replica="{replica}"}}', "value": value}]}

    test = {"rule_files": [], "evaluation_interval": "5s", "tests": [{
        "interval": "5s",
        "input_series": [
            {"series": f'{metric}{{deployment="tiny", replica="tiny-0"}}', "values": "0x4 1x16"},
            {"series": f'{metric}{{deployment="tiny", replica="tiny-1"}}', "values": "_x11 1x8"},
        ],
        "promql_expr_test": [*(bar("tiny-0", t, int(t == 40)) for t in (20, 40, 60, 80, 100)),
                             *(bar("tiny-1", t, int(t == 60)) for t in (60, 80, 100))],
    }]}
    (tmp_path / "bars.test.yaml").write_text(yaml.safe_dump(test))
    result = run(prometheus_tools["promtool"], "test", "rules", "bars.test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
