"""dashboards/grafana/ is what the code renders: the committed files, `render --check`, thresholds from options."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from controlplane.grafana.dashboards import dashboards
from controlplane.grafana.model import Panel
from controlplane.grafana.render import app, build, main, render, stale
from controlplane.slo.options import RuleOptions

REPO = Path(__file__).resolve().parents[3]
OUT = REPO / "dashboards" / "grafana"
OPTIONS = REPO / "alerts" / "alerting.yaml"


def test_the_committed_dashboards_are_what_the_code_renders() -> None:
    problems = stale(OUT, OPTIONS)
    assert not problems, "dashboards/grafana is stale; run `controlplane dashboards render`:\n" + "\n".join(problems)


def test_there_is_one_dashboard_file_per_dashboard_and_both_provisioning_files() -> None:
    files = set(build(RuleOptions()))
    assert {f for f in files if f.endswith(".json")} == {
        "dashboards/vllm-fleet.json", "dashboards/slos.json", "dashboards/gpu.json", "dashboards/cost.json",
        "dashboards/tuner.json"}
    assert {"provisioning/datasources/prometheus.yaml", "provisioning/dashboards/controlplane.yaml"} <= files


@pytest.fixture
def fresh(tmp_path: Path) -> Path:
    out = tmp_path / "grafana"
    render(out, OPTIONS)
    return out


def test_render_writes_every_file_and_check_then_passes(fresh: Path) -> None:
    assert stale(fresh, OPTIONS) == []
    assert main(True, fresh, OPTIONS) == 0


def test_check_fails_on_an_edited_dashboard_and_shows_the_diff(fresh: Path) -> None:
    path = fresh / "dashboards" / "gpu.json"
    data = json.loads(path.read_text())
    data["title"] = "GPU (edited by hand)"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    problems = stale(fresh, OPTIONS)
    assert len(problems) == 1 and problems[0].startswith("dashboards/gpu.json: differs")
    assert "GPU (edited by hand)" in problems[0]
    assert main(True, fresh, OPTIONS) == 1


def test_check_fails_on_a_missing_file_and_on_a_dashboard_no_longer_generated(fresh: Path) -> None:
    (fresh / "provisioning" / "datasources" / "prometheus.yaml").unlink()
    shutil.copy(fresh / "dashboards" / "cost.json", fresh / "dashboards" / "old.json")
    assert sorted(stale(fresh, OPTIONS)) == ["dashboards/old.json: no longer generated",
                                             "provisioning/datasources/prometheus.yaml: missing"]
    assert main(True, fresh, OPTIONS) == 1
    assert main(False, fresh, OPTIONS) == 0  # a render repairs both
    assert stale(fresh, OPTIONS) == [] and not (fresh / "dashboards" / "old.json").exists()


def test_check_fails_when_the_alerting_options_changed_since_the_render(fresh: Path, tmp_path: Path) -> None:
    options = tmp_path / "alerting.yaml"
    options.write_text(yaml.safe_dump({"apiVersion": "controlplane/v1", "kind": "AlertingOptions",
                                       "spec": {"kv_cache_usage_ratio": 0.75}}))
    assert "dashboards/vllm-fleet.json: differs" in "\n".join(stale(fresh, options))


def test_an_invalid_options_file_is_a_clear_error_not_a_traceback(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    options = tmp_path / "alerting.yaml"
    options.write_text("apiVersion: controlplane/v1\nkind: AlertingOptions\nspec: {kv_cache_usage_ratio: 3}\n")
    assert main(False, tmp_path / "out", options) == 2
    assert "kv_cache_usage_ratio" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _panel(spec_title: str, panel_title: str, options: RuleOptions) -> Panel:
    spec = next(s for s in dashboards(options) if s.title == spec_title)
    return next(p for p in spec.panels() if p.title == panel_title)


def test_panel_thresholds_are_the_alerting_thresholds() -> None:
    options = RuleOptions(kv_cache_usage_ratio=0.8, gpu_temp_c=90, cost_budget_per_million_tokens_usd=2.5)
    kv = _panel("vLLM fleet", "KV cache usage", options).thresholds
    temp = _panel("GPU (DCGM)", "Temperature", options).thresholds
    cost = _panel("Cost", "$ per million tokens", options).thresholds
    assert [s.value for s in kv] == [None, 0.7, 0.8]
    assert [s.value for s in temp][-1] == 90
    assert [(s.value, s.color) for s in cost] == [(None, "green"), (2.5, "red")]
    assert _panel("Cost", "$ per million tokens", RuleOptions()).thresholds == ()  # no budget: no red line


def test_rendering_is_deterministic_and_does_not_depend_on_the_order_of_calls() -> None:
    first = build(RuleOptions())
    build(RuleOptions(kv_cache_usage_ratio=0.5))
    assert build(RuleOptions()) == first


def test_the_typer_app_renders_and_checks_with_exit_codes(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "g"
    args = ["render", "--out", str(out), "--options", str(OPTIONS)]
    assert runner.invoke(app, [*args, "--check"]).exit_code == 1  # nothing rendered yet: every file missing
    assert runner.invoke(app, args).exit_code == 0
    assert runner.invoke(app, [*args, "--check"]).exit_code == 0


def test_event_bars_count_each_event_once() -> None:
    """A bar is one step: increase() over $__rate_interval spans several steps, so each restart or decision was
    drawn 2-4 times; over $__interval, with steps of at least 4 scrapes (5 s), each lands in one bar."""
    bars = [p for spec in dashboards(RuleOptions()) for row in spec.rows for p in row.panels if p.bars]
    assert len(bars) >= 2
    for p in bars:
        assert p.min_interval == "20s", p.title
        assert all("offset $__interval" in q.expr.render() and "$__rate_interval" not in q.expr.render()
                   for q in p.queries), p.title
    tuner = json.loads((REPO / "dashboards" / "grafana" / "dashboards" / "tuner.json").read_text())
    assert sorted(p["interval"] for p in tuner["panels"] if "interval" in p) == ["20s", "20s"]
