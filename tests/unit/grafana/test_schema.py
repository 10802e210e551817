"""Each committed dashboard against the SDK's model, plus what Grafana needs that no model checks.

grafana-foundation-sdk 0.0.21 ships no JSON schema (its package holds only generated Python), so a dashboard is
validated by decoding it with the SDK's own model (`Dashboard.from_json`, panel and query plugins registered) and
encoding it again: a key the model does not know, or a panel or query it cannot decode, changes the result.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from controlplane.grafana import sdk
from controlplane.grafana.promql import GRAFANA_BUILTINS

REPO = Path(__file__).resolve().parents[3]
FILES = sorted((REPO / "dashboards" / "grafana" / "dashboards").glob("*.json"))
VAR = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def panels(d: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in d["panels"] if p["type"] != "row"]


def test_every_dashboard_is_committed() -> None:
    assert [p.name for p in FILES] == ["cost.json", "gpu.json", "slos.json", "tuner.json", "vllm-fleet.json"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_the_dashboard_decodes_with_the_sdk_model_without_losing_anything(path: Path) -> None:
    data = load(path)
    assert sdk.roundtrip(data) == data


@pytest.mark.parametrize(("where", "edit"), [
    ("a key the dashboard model does not have", lambda d: d.update(titel="typo")),
    ("a key a timeseries panel does not have", lambda d: panels(d)[0].update(fieldConfg={})),
    ("a key a Prometheus query does not have", lambda d: panels(d)[0]["targets"][0].update(exp="up")),
])
def test_the_roundtrip_catches(where: str, edit: Any) -> None:
    data = copy.deepcopy(load(REPO / "dashboards" / "grafana" / "dashboards" / "tuner.json"))
    edit(data)
    assert sdk.roundtrip(data) != data, where


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_uids_titles_and_panel_ids_are_unique_and_every_panel_says_what_it_shows(path: Path) -> None:
    data = load(path)
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids)) and 0 not in ids
    assert data["uid"] == f"controlplane-{path.stem}" and len(data["uid"]) <= 40  # Grafana's uid limit
    for p in panels(data):
        assert p["title"] and p["description"], p
        assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]


def test_dashboard_uids_and_titles_differ_across_files() -> None:
    data = [load(p) for p in FILES]
    assert len({d["uid"] for d in data}) == len({d["title"] for d in data}) == len(FILES)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_panels_fit_the_24_column_grid_and_do_not_overlap(path: Path) -> None:
    cells: set[tuple[int, int]] = set()
    for p in load(path)["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_every_query_uses_the_datasource_variable_and_only_defined_variables(path: Path) -> None:
    data = load(path)
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    defined = set(variables) | set(GRAFANA_BUILTINS)
    texts = [t["expr"] for p in panels(data) for t in p["targets"]]
    texts += [v["query"] for v in variables.values() if v["type"] == "query"]
    used = {a or b for text in texts for a, b in VAR.findall(text)}
    assert used <= defined, f"undefined variables: {used - defined}"
    for p in panels(data):
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"]["uid"] == "${datasource}" and v["multi"] and v["includeAll"], v["name"]


def test_the_fleet_dashboard_filters_by_deployment_and_replica() -> None:
    data = load(REPO / "dashboards" / "grafana" / "dashboards" / "vllm-fleet.json")
    names = [v["name"] for v in data["templating"]["list"]]
    assert names == ["datasource", "deployment", "replica"]
    for p in panels(data):
        for t in p["targets"]:
            assert 'deployment=~"$deployment"' in t["expr"] and 'replica=~"$replica"' in t["expr"], p["title"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_a_time_series_draws_the_thresholds_it_colours_by(path: Path) -> None:
    """Grafana draws a time series' thresholds only with a threshold style; without one the alert's line on a
    panel (KV usage, span coverage, burn rate) would be invisible."""
    for p in panels(load(path)):
        defaults = p.get("fieldConfig", {}).get("defaults", {})
        steps = [s for s in defaults.get("thresholds", {}).get("steps", []) if s.get("value") is not None]
        if p["type"] == "timeseries" and steps:
            assert defaults["custom"].get("thresholdsStyle", {}).get("mode") == "dashed", p["title"]
