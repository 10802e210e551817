"""bench/sim_fidelity.py's analysis of a rerun: real vLLM against itself next to the simulator, and a saved run
with its reruns replayed as it was measured."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.sim_fidelity import (
    SHAPES,
    Calibrated,
    ConfigRun,
    LoadRun,
    dump_runs,
    errors,
    load_runs,
    nearest,
    noise_floor,
    stats_of,
)
from controlplane.tuning import calibrate
from controlplane.tuning.perf_model import Coefficients


def rows(n: int, ttft: float, tpot: float, rate: float = 10.0) -> list[Any]:
    return [{"trace_id": f"{i:032x}", "arrival_unix_s": 1e9 + i / rate, "prompt_tokens": 64, "completion_tokens": 32,
             "ttft_s": ttft * (1 + (i % 10) / 10), "tpot_s": tpot, "e2e_s": ttft + 31 * tpot, "queue_s": 0.0}
            for i in range(n)]


def test_stats_and_relative_errors() -> None:
    first = stats_of(rows(100, 0.010, 0.005))
    assert first["ttft_p50"] == pytest.approx(0.0145, rel=0.05) and first["tpot_p50"] == pytest.approx(0.005)
    e = errors(first, {k: v * 1.2 for k, v in first.items()})
    assert all(x == pytest.approx(0.2) for x in e.values())


def test_a_rerun_is_compared_with_the_first_run_and_survives_a_save_and_replay(tmp_path: Path) -> None:
    shape = SHAPES["A"]
    load = LoadRun(0.3, 10.0, rows(100, 0.010, 0.005), 0.0, reruns=[rows(100, 0.013, 0.005)])
    runs = [ConfigRun(shape, 30.0, [load])]
    fit = calibrate.Fit(Coefficients(1e-3, 1e-6, 0.0), 100, 0, None, None, None, None, None)
    out = noise_floor(runs, {"A": Calibrated(fit, 0.0)})
    assert len(out) == 1
    assert out[0]["rerun_vs_first"]["ttft_p50"] == pytest.approx(0.3, abs=0.01)
    assert out[0]["rerun_vs_first"]["tpot_p50"] == pytest.approx(0.0)
    assert set(out[0]["simulator_vs_pooled"]) == {"ttft_p50", "ttft_p90", "tpot_p50"}
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps({"runs": dump_runs(runs)}))
    again = load_runs(saved)
    assert again[0].loads[0].reruns == load.reruns
    # A file saved before reruns existed replays with none.
    old = json.loads(saved.read_text())
    del old["runs"][0]["loads"][0]["reruns"]
    saved.write_text(json.dumps(old))
    assert load_runs(saved)[0].loads[0].reruns == []
    assert noise_floor(load_runs(saved), {"A": Calibrated(fit, 0.0)}) == []


def test_nearest_calibrates_each_load_from_the_ramp_just_before_it(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    shape = SHAPES["A"]
    fitted: list[list[Any]] = []
    slow = Coefficients(2e-3, 1e-6, 0.0)

    def fit_rows(rows: list[Any], **_: Any) -> tuple[calibrate.Fit, float]:
        fitted.append(rows)
        return calibrate.Fit(slow, len(rows), 0, None, None, None, None, None), 0.001

    monkeypatch.setattr(calibrate, "fit_rows", fit_rows)
    config_fit = calibrate.Fit(Coefficients(1e-3, 1e-6, 0.0), 100, 0, None, None, None, None, None)
    first = LoadRun(0.3, 10.0, rows(100, 0.010, 0.005), 0.0)
    second = LoadRun(0.6, 20.0, rows(100, 0.012, 0.005), 0.0, ramp=rows(50, 0.02, 0.006, rate=5.0))
    run = ConfigRun(shape, 30.0, [first, second], ramp=rows(60, 0.01, 0.005))
    model = nearest({"A": Calibrated(config_fit, 0.0)}, per_seq=True)
    assert model(run, first).step_cost == config_fit.step_cost  # the configuration's own ramp
    assert fitted == []
    near = model(run, second)
    assert near.step_cost == calibrate.Fit(slow, 50, 0, None, None, None, None, None).step_cost
    assert near.api_path_s == 0.001
    assert fitted == [[dict(r) for r in second.ramp]]  # its own ramp, never the judged load's rows
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps({"runs": dump_runs([run])}))
    assert load_runs(saved)[0].loads[1].ramp == second.ramp
    second.ramp = []  # a run measured without --calibrate nearest
    with pytest.raises(SystemExit, match="only a run made with --calibrate nearest"):
        model(run, second)
