"""Rendering alerts/: the files it makes, `--check` on stale output, errors and warnings on the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from controlplane.slo.model import BurnWindow, SpecError
from controlplane.slo.options import RuleOptions, load_options
from controlplane.slo.render import app, build, render
from tests.unit.slo.rule_factories import make_slo

REPO = Path(__file__).resolve().parents[3]
SLOS = REPO / "alerts" / "slos"
runner = CliRunner()


def test_render_writes_rules_tests_alertmanager_and_runbooks(tmp_path: Path) -> None:
    written = {p.relative_to(tmp_path).as_posix() for p in render([SLOS], tmp_path)}
    assert {"alertmanager.yml", "runbooks.md", "rules/operational.rules.yaml", "rules/slo-budgets.rules.yaml",
            "rules/slo-tiny-ttft.rules.yaml", "rules/slo-tiny-errors.rules.yaml", "tests/operational.test.yaml",
            "tests/slo-tiny-errors.page-14.4x-1h.test.yaml", "tests/slo-tiny-tpot.guards.test.yaml"} <= written
    # tpot has the same tier arithmetic and rule shape as ttft: its tiers are tested through ttft's files
    assert not any(p.startswith("tests/slo-tiny-tpot.page") for p in written)
    assert "## VllmSloErrorBudgetBurnPage" in (tmp_path / "runbooks.md").read_text()


def test_check_passes_on_a_fresh_render_and_names_changed_and_leftover_files(tmp_path: Path) -> None:
    args = ["render", str(SLOS), "--out", str(tmp_path)]
    assert runner.invoke(app, args).exit_code == 0
    assert runner.invoke(app, [*args, "--check"]).exit_code == 0
    rules = tmp_path / "rules" / "slo-tiny-ttft.rules.yaml"
    rules.write_text(rules.read_text().replace("14.4", "14"))
    (tmp_path / "tests" / "old.test.yaml").write_text("{}")
    result = runner.invoke(app, [*args, "--check"])
    assert result.exit_code == 1
    assert "rules/slo-tiny-ttft.rules.yaml: differs" in result.output
    assert "tests/old.test.yaml: no longer generated" in result.output
    # The fix it names renders what was checked, where it was checked.
    assert f"run `controlplane slo render {SLOS} --out {tmp_path}` and commit" in " ".join(result.output.split())
    assert runner.invoke(app, args).exit_code == 0 and not (tmp_path / "tests" / "old.test.yaml").exists()


def test_a_bad_spec_exits_2_naming_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: controlplane/v1\nkind: SLO\nmetadata: {name: x}\nspec: {deployment: tiny, sli: ttft, "
                   "threshold: 1s, objective: 1.5}\n")
    result = runner.invoke(app, ["render", str(bad), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "spec.objective: must be a fraction between 0 and 1 exclusive" in result.output


@pytest.mark.parametrize("source", ["empty.yaml", "emptydir", "binary.yaml", "infrate.yaml"])
def test_input_without_a_valid_slo_renders_nothing_and_removes_nothing(tmp_path: Path, source: str) -> None:
    out = tmp_path / "out"
    assert runner.invoke(app, ["render", str(SLOS), "--out", str(out)]).exit_code == 0
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00")
    text = (SLOS / "tiny.yaml").read_text()
    assert "min_request_rate_per_s: 0.1" in text
    (tmp_path / "infrate.yaml").write_text(text.replace("min_request_rate_per_s: 0.1", "min_request_rate_per_s: .inf"))
    result = runner.invoke(app, ["render", str(tmp_path / source), "--out", str(out)])
    assert result.exit_code == 2 and str(tmp_path / source) in " ".join(result.output.split())
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    assert {"emptydir": "holds no SLO", "empty.yaml": "holds no SLO", "binary.yaml": "not UTF-8",
            "infrate.yaml": "min_request_rate_per_s"}[source] in " ".join(result.output.split())
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before


def test_warnings_reach_the_user(tmp_path: Path) -> None:
    result = runner.invoke(app, ["render", str(SLOS), "--out", str(tmp_path)])
    assert "warning: tiny-goodput: goodput cannot be computed from histograms" in " ".join(result.output.split())


def test_options_come_from_the_alerting_file_next_to_the_output(tmp_path: Path) -> None:
    (tmp_path / "alerting.yaml").write_text("apiVersion: controlplane/v1\nkind: AlertingOptions\nspec:\n"
                                            "  cost_budget_per_million_tokens_usd: 3\n  kv_cache_for: 2m\n"
                                            "  span_coverage_ratio: 0.95\n  span_coverage_for: 15m\n")
    assert load_options(tmp_path / "alerting.yaml") == RuleOptions(cost_budget_per_million_tokens_usd=3.0,
                                                                   kv_cache_for_s=120.0, span_coverage_ratio=0.95,
                                                                   span_coverage_for_s=900.0)
    render([SLOS], tmp_path)
    text = (tmp_path / "rules" / "operational.rules.yaml").read_text()
    assert "controlplane_cost_per_million_tokens_usd) > 3" in text and "for: 2m" in text
    assert "(controlplane_span_coverage_ratio) < 0.95\n    for: 15m" in text


def test_a_bad_options_file_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "alerting.yaml"
    path.write_text("apiVersion: controlplane/v1\nkind: AlertingOptions\nspec:\n  kv_cache_usage_ratio: 90\n"
                    "  gpu_temp: 80\n")
    with pytest.raises(SpecError) as exc:
        load_options(path)
    assert f"{path}: spec.kv_cache_usage_ratio: Input should be less than or equal to 1 (got 90)" in str(exc.value)
    assert "spec.gpu_temp: unknown field; allowed: runbook_base_url, kv_cache_usage_ratio" in str(exc.value)
    path.write_bytes(b"\xff\xfe not UTF-8")
    with pytest.raises(SpecError, match=f"{path}: cannot read AlertingOptions: 'utf-8' codec can't decode"):
        load_options(path)


def test_an_slo_the_generator_cannot_test_still_gets_rules_and_a_warning() -> None:
    odd = make_slo("odd", windows=(BurnWindow("page", 3600.5, 300.25, 14.4),))  # not whole seconds
    files, warnings = build([odd], RuleOptions())
    assert "rules/slo-odd.rules.yaml" in files and not any(f.startswith("tests/slo-odd") for f in files)
    assert any(w.startswith("odd: no promtool unit tests generated: generated tests need whole-second windows")
               for w in warnings)
