"""Every PromQL expression of the committed dashboards through the real parser (Debian's promtool).

promtool has no "parse this expression" command, so each expression becomes a recording rule in a temporary rules
file and `promtool check rules` parses them all. Grafana's variables are substituted first, as Grafana would:
`$deployment` in a regex matcher by a value, `$__rate_interval` / `$__range` by a duration.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from controlplane.grafana.dashboards import dashboards
from controlplane.grafana.promql import by_vars, metric_names, quantile_of, rate, sum_all
from controlplane.slo.options import RuleOptions
from controlplane.slo.promql import Binary, Call, Number

REPO = Path(__file__).resolve().parents[3]
FILES = sorted((REPO / "dashboards" / "grafana" / "dashboards").glob("*.json"))
BUILTINS = {"__rate_interval": "1m", "__range": "3h", "__interval": "15s"}
VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+), (?P<label>\w+)\)$")


def substitute(expr: str, variables: set[str]) -> str:
    """Grafana's interpolation, for parsing: every dashboard variable is a plain value, builtins are durations."""
    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name in BUILTINS:
            return BUILTINS[name]
        if name in variables:
            return "tiny-0"
        raise AssertionError(f"{expr!r} uses ${name}, which is neither a dashboard variable nor a Grafana builtin")
    return VAR.sub(value, expr)


def expressions(path: Path) -> list[str]:
    """The PromQL of every panel query and of every query variable (the selector inside label_values)."""
    data = json.loads(path.read_text())
    variables = {v["name"] for v in data["templating"]["list"]}
    out = [t["expr"] for p in data["panels"] if p["type"] != "row" for t in p["targets"]]
    for v in data["templating"]["list"]:
        if v["type"] == "query":
            m = LABEL_VALUES.match(v["query"])
            assert m, f"{path.name}: variable {v['name']}: not a label_values() query: {v['query']}"
            out.append(m["selector"])
    return [substitute(e, variables) for e in out]


def check_rules(promtool: str, exprs: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    rules = {"groups": [{"name": "dashboard-queries", "rules": [
        {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "queries.rules.yaml"
    path.write_text(yaml.safe_dump(rules, width=10**6))
    return subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_promtool_parses_every_query_of_the_dashboard(prometheus_tools: dict[str, str], path: Path,
                                                      tmp_path: Path) -> None:
    exprs = expressions(path)
    assert len(exprs) >= 8
    result = check_rules(prometheus_tools["promtool"], exprs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_promtool_rejects_a_query_whose_grafana_range_was_not_substituted(prometheus_tools: dict[str, str],
                                                                          tmp_path: Path) -> None:
    raw = json.loads((REPO / "dashboards/grafana/dashboards/vllm-fleet.json").read_text())["panels"][1]["targets"][0]
    assert "[$__rate_interval]" in raw["expr"]
    result = check_rules(prometheus_tools["promtool"], [raw["expr"]], tmp_path)
    assert result.returncode != 0 and "dashboard:query_0" not in result.stdout


def test_a_dashboard_variable_that_is_not_defined_fails_the_substitution() -> None:
    with pytest.raises(AssertionError, match=r"\$replcia"):
        substitute('up{replica=~"$replcia"}', {"replica"})


def test_metric_names_walks_calls_aggregations_and_both_sides_of_binary_operators() -> None:
    used, free = by_vars("DCGM_FI_DEV_FB_USED", "gpu"), by_vars("DCGM_FI_DEV_FB_FREE", "gpu")
    expr = Binary("/", sum_all(rate(used)), Binary("+", Number(1), Call("clamp_min", (free, Number(0)))))
    assert metric_names([expr]) == {"DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE"}
    assert metric_names([quantile_of("vllm:e2e_request_latency_seconds", 0.9, ("deployment",), ())]) == {
        "vllm:e2e_request_latency_seconds_bucket"}


def test_the_names_walked_from_the_query_trees_are_in_the_committed_json() -> None:
    """The metric-name tests read names from the trees; this ties them to the committed files."""
    for spec in dashboards(RuleOptions()):
        text = (REPO / "dashboards/grafana/dashboards" / f"{spec.uid.removeprefix('controlplane-')}.json").read_text()
        walked = spec.metric_names()
        assert len(walked) >= 4, spec.uid
        for name in walked:
            assert json.dumps(name) in text or f"{name}{{" in text or f"{name}[" in text, (spec.uid, name)
