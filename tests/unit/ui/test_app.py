"""The Streamlit app, page by page, against a real plane (FastAPI + seeded SQLite over HTTP) with AppTest."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pandas as pd
import pytest
from fastapi import FastAPI
from streamlit.testing.v1 import AppTest

from tests.unit.ui.conftest import OpenPage, cells, charts, frames, texts
from tests.unit.ui.plane import DEPLOYMENT, IDLE, REAL, SIM, WATCHED, Seeded, seed, serve, serve_app

PAGES = ("fleet", "slos", "latency", "kv-cache", "gpu", "cost", "recommendations", "history")
TITLES = ("Fleet overview", "SLOs", "Latency phases", "KV cache", "GPU telemetry", "Cost", "Recommendations",
          "Action history")


def _row(at_frames: list[pd.DataFrame], column: str, value: str, having: str | None = None) -> dict[str, str]:
    """The first table row whose `column` is `value` (in a table that also has column `having`)."""
    for df in at_frames:
        if column in df.columns and (having is None or having in df.columns):
            hit = df[df[column] == value]
            if len(hit):
                return {str(k): str(v) for k, v in hit.iloc[0].to_dict().items()}
    raise AssertionError(f"no row with {column}={value!r}")


def _chart(at: AppTest, title: str) -> tuple[dict[str, Any], list[pd.DataFrame]]:
    for spec, data in charts(at):
        if spec.get("description") == title:
            return spec, data
    raise AssertionError(f"no chart titled {title!r}")


@pytest.mark.parametrize(("page", "title"), list(zip(PAGES, TITLES, strict=True)))
def test_every_page_renders_its_title_without_an_exception_or_error(plane: tuple[str, Seeded], open_page: OpenPage,
                                                                    page: str, title: str) -> None:
    at = open_page(plane[0], page)
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert [t.value for t in at.title] == [title]


def test_an_unknown_page_parameter_falls_back_to_the_fleet_overview(plane: tuple[str, Seeded],
                                                                    open_page: OpenPage) -> None:
    at = open_page(plane[0], "no-such-page")
    assert [t.value for t in at.title] == ["Fleet overview"] and not at.exception


def test_fleet_shows_replicas_states_engine_args_and_labels_the_simulated_replica(
        plane: tuple[str, Seeded], open_page: OpenPage) -> None:
    at = open_page(plane[0], "fleet")
    f = frames(at)
    real, sim, watched, idle = (_row(f, "replica", n, having="engine") for n in (REAL, SIM, WATCHED, IDLE))
    assert (real["engine"], sim["engine"], watched["engine"]) == ("vLLM", "simulated", "vLLM")
    assert real["state"] == "ready" and real["restarts"] == "1" and real["deployment"] == DEPLOYMENT
    assert watched["state"] == "watched" and watched["deployment"] == "unknown" and watched["restarts"] == "unknown"
    assert idle["restarts"] == "unknown"  # stored but not running: the supervisor says nothing about it
    assert _row(f, "replica", f"{SIM} (simulated)")["in flight"] == "2"  # the router backends table
    assert _row(f, "argument", "max_num_seqs")["value"] == "8"
    assert _row(f, "argument", "quantization")["value"] == "vLLM default"
    page = texts(at)
    assert "desired replicas=2" in page and "ready=2/2" in page and "price / replica-hour=$1.25" in page
    assert "simulated=1" in page


def test_slos_show_attainment_budget_burn_rates_alert_state_and_no_data(plane: tuple[str, Seeded],
                                                                        open_page: OpenPage) -> None:
    at = open_page(plane[0], "slos")
    f = frames(at)
    busy, idle = _row(f, "SLO", "ttft-fast"), _row(f, "SLO", "e2e-idle")
    assert busy["attainment"] == "98.500%" and busy["alert"] == "firing (page)"
    assert busy["error budget left"] == "-50.0%"  # 1.5% bad against a 1% budget
    assert idle["attainment"] == "no data" and idle["error budget left"] == "no data" and idle["alert"] == "inactive"
    burn = _row(f, "window", "long 1h")
    assert burn["burn rate"] == "10.00x" and burn["over threshold"] == "no"
    assert "unknown" in {r for df in f if "burn rate" in df.columns for r in df["burn rate"]}  # e2e-idle: no data


def test_slo_attainment_history_is_charted_from_the_api(plane: tuple[str, Seeded], open_page: OpenPage) -> None:
    """Needs GET /api/v1/slos/{name}/history (helper A)."""
    at = open_page(plane[0], "slos")
    _, data = _chart(at, "ttft-fast: attainment per step (dashed: objective)")
    att = data[0]["attainment"].dropna()
    assert len(att) >= 5 and ((att >= 0) & (att <= 1)).all()
    assert "not available" not in texts(at)


def test_latency_phases_summary_histograms_and_waterfall(plane: tuple[str, Seeded], open_page: OpenPage) -> None:
    at = open_page(plane[0], "latency")
    f = frames(at)
    assert _row(f, "phase", "prefill")["known"] == "60" and _row(f, "phase", "prefill")["unknown"] == "1"
    assert _row(f, "phase", "queue")["unknown"] == "0"
    for phase in ("queue", "prefill", "decode"):
        _, data = _chart(at, f"{phase} time")
        assert len(data[0]) == 61 if phase == "queue" else 60
    # The default waterfall is the newest request with every phase known: req-059 (queue 0.006, prefill 0.089).
    wf = [d for spec, ds in charts(at) for d in ds if "start_s" in d.columns]
    assert len(wf) == 1
    bars = wf[0].set_index("phase")
    assert list(bars.index) == ["queue", "prefill", "decode"]
    assert bars.loc["queue", "start_s"] == 0 and bars.loc["prefill", "start_s"] == pytest.approx(0.006)
    assert bars.loc["prefill", "end_s"] == pytest.approx(0.006 + 0.089)
    assert bars.loc["decode", "start_s"] == bars.loc["prefill", "end_s"]


def test_a_request_without_phase_split_says_unknown_instead_of_drawing_zero(plane: tuple[str, Seeded],
                                                                           open_page: OpenPage) -> None:
    at = open_page(plane[0], "latency")
    box = at.selectbox(key="waterfall_request")
    box.select_index(next(i for i, o in enumerate(box.options) if o.startswith("req-partial"))).run()
    assert any("unknown phase durations: prefill, decode" in w.value for w in at.warning)
    assert "TTFT=unknown" in texts(at) and "end to end=500.0 ms" in texts(at)
    wf = [d for _, ds in charts(at) for d in ds if "start_s" in d.columns]
    assert [list(d["phase"]) for d in wf] == [["queue"]]


def test_latency_can_be_filtered_to_one_replica(plane: tuple[str, Seeded], open_page: OpenPage) -> None:
    at = open_page(plane[0], "latency")
    at.selectbox(key="latency_replica").set_value(SIM).run()
    assert "30 requests" in texts(at)
    assert _row(frames(at), "phase", "queue")["known"] == "30"


def test_kv_cache_latest_values_unknown_readings_and_preemption_rates(plane: tuple[str, Seeded],
                                                                      open_page: OpenPage) -> None:
    at = open_page(plane[0], "kv-cache")
    f = frames(at)
    sim, real, watched = (_row(f, "replica", n) for n in (f"{SIM} (simulated)", REAL, WATCHED))
    assert sim["KV usage"] == "79.50%" and real["preemptions in window"] == "9" and sim["preemptions in window"] == "5"
    assert watched["KV usage"] == "unknown" and watched["running"] == "0"
    assert watched["preemptions in window"] == "unknown"
    _, usage = _chart(at, "KV cache usage")
    per_replica = usage[0].groupby("replica").size().to_dict()
    assert per_replica == {REAL: 59, f"{SIM} (simulated)": 60}  # the lost scrape is a gap, not a zero
    segments = usage[0].groupby("replica")["segment"].nunique().to_dict()
    assert segments == {REAL: 2, f"{SIM} (simulated)": 1}  # and the line is broken there
    _, rates = _chart(at, "preemptions per second")
    r = rates[0]
    assert (r["preemptions_per_s"] >= 0).all() and r["preemptions_per_s"].max() == pytest.approx(0.1)
    assert len(r[r["replica"] == REAL]) == 57  # no rate into or out of the lost scrape


def test_gpu_page_says_there_is_no_telemetry(plane: tuple[str, Seeded], open_page: OpenPage) -> None:
    at = open_page(plane[0], "gpu")
    assert any("No GPU telemetry" in i.value for i in at.info) and not at.dataframe


def test_gpu_page_shows_stored_gpu_readings(tmp_path_factory: pytest.TempPathFactory, open_page: OpenPage) -> None:
    seeded = seed(tmp_path_factory.mktemp("gpu") / "store.db", gpu=True)
    with serve(seeded) as url:
        at = open_page(url, "gpu")
    (table,) = frames(at)
    gpu = table["gpu-host #0"]  # one column per GPU
    assert gpu["model"] == "NVIDIA H100" and gpu["temperature"] == "62 °C" and gpu["utilisation"] == "70%"
    assert gpu["memory used"] == "40.0 GiB of 80.0 GiB" and gpu["last XID"] == "0"
    assert "GPUs=1" in texts(at) and "mean utilisation=60%" in texts(at) and not at.exception
    _, util = _chart(at, "GPU utilisation")
    assert sorted(util[0]["utilisation"].round(3)) == [0.6, 0.7]


def test_cost_shows_priced_deployments_and_unknown_prices_as_unknown(plane: tuple[str, Seeded],
                                                                     open_page: OpenPage) -> None:
    at = open_page(plane[0], "cost")
    f = frames(at)
    assert _row(f, "deployment", DEPLOYMENT)["price per replica-hour"] == "$1.2500"
    watched = _row(f, "deployment", "watched")
    assert watched["price per replica-hour"] == "unknown" and watched["cost"] == "unknown"
    assert any("Price unknown for watched" in w.value for w in at.warning)
    _, hourly = _chart(at, "$/hour")
    d = hourly[0]
    assert set(d["deployment"]) == {DEPLOYMENT}  # the unpriced one is absent, not drawn at $0
    assert 0 < d["usd_per_hour"].max() <= 2 * 1.25 + 1e-9
    _chart(at, "$/1M prompt tokens")
    _chart(at, "$/1M completion tokens")


def test_recommendation_shows_its_evidence_and_enabled_buttons(plane: tuple[str, Seeded],
                                                               open_page: OpenPage) -> None:
    url, seeded = plane
    at = open_page(url, "recommendations")
    rid = seeded.recommendation_id
    assert f"#{rid} · {DEPLOYMENT} · scale · open" in texts(at)
    f = frames(at)
    assert _row(f, "setting", "replicas") == {"setting": "replicas", "current": "2", "proposed": "3"}
    assert _row(f, "name", "rate_per_s")["value"] == "3.5"
    assert _row(f, "name", "confidence")["value"] == "80%"
    assert _row(f, "name", "predicted_attainment")["value"] == "0.9962"
    assert _row(f, "config", "3 replicas")["usd_per_hour"] == "3.75"
    assert not at.button(key=f"apply_{rid}").disabled and not at.button(key=f"dismiss_{rid}").disabled


def test_apply_calls_the_plane_which_asks_the_supervisor_for_the_recommended_replicas(
        fresh_plane: tuple[str, Seeded], open_page: OpenPage) -> None:
    url, seeded = fresh_plane
    rid = seeded.recommendation_id
    at = open_page(url, "recommendations")
    at.button(key=f"apply_{rid}").click().run()
    assert seeded.control.calls == [("scale", DEPLOYMENT, 3, "user", f"recommendation_{rid}")]
    assert [s.value for s in at.success] == [f"recommendation {rid} is now applied"]
    assert any("No open recommendation" in i.value for i in at.info)
    at.selectbox(key="recommendation_status").set_value("applied").run()
    assert f"#{rid} · {DEPLOYMENT} · scale · applied" in texts(at)
    assert [b.key for b in at.button] == ["search_start"]  # no Apply / Dismiss on a decided one


def test_a_search_started_from_the_page_reaches_the_plane_and_is_listed(fresh_plane: tuple[str, Seeded],
                                                                        open_page: OpenPage) -> None:
    url, seeded = fresh_plane
    at = open_page(url, "recommendations")
    at.number_input(key="search_canary").set_value(1)
    at.number_input(key="search_rate").set_value(12.5)
    at.button(key="search_start").click().run()
    assert [(d, p.canary_trials, p.target_rps) for d, p in seeded.searches.started] == [(DEPLOYMENT, 1, 12.5)]
    assert [s.value for s in at.success][0].startswith(f"search 1 of {DEPLOYMENT} started")
    at.run()
    row = _row(frames(at), "search", "1")
    assert row["status"] == "done" and row["recommendation"] == "7" and row["last step"].startswith("searching")
    assert seeded.control.calls == []  # a search changes nothing by itself


def test_dismiss_changes_the_status_without_touching_the_fleet(fresh_plane: tuple[str, Seeded],
                                                              open_page: OpenPage) -> None:
    url, seeded = fresh_plane
    rid = seeded.recommendation_id
    at = open_page(url, "recommendations")
    at.button(key=f"dismiss_{rid}").click().run()
    assert seeded.control.calls == []
    assert [s.value for s in at.success] == [f"recommendation {rid} is now dismissed"]


def test_without_a_token_the_buttons_are_disabled(plane: tuple[str, Seeded], open_page: OpenPage) -> None:
    url, seeded = plane
    at = open_page(url, "recommendations", token=None)
    assert at.button(key=f"apply_{seeded.recommendation_id}").disabled
    assert "Read only: CONTROLPLANE_API_TOKEN is not set" in texts(at)


def test_a_wrong_token_shows_the_planes_refusal_and_changes_nothing(fresh_plane: tuple[str, Seeded],
                                                                    open_page: OpenPage) -> None:
    url, seeded = fresh_plane
    at = open_page(url, "recommendations", token="wrong")
    at.button(key=f"apply_{seeded.recommendation_id}").click().run()
    assert seeded.control.calls == [] and not at.exception
    assert len(at.error) == 1 and "401" in at.error[0].value and "bearer token" in at.error[0].value


def test_history_lists_actions_with_config_changes_and_the_alert_timeline(plane: tuple[str, Seeded],
                                                                          open_page: OpenPage) -> None:
    at = open_page(plane[0], "history")
    f = frames(at)
    user = _row(f, "actor", "user")
    assert user["kind"] == "scale" and user["config change"] == "replicas: 1 -> 2" and user["replica"] == REAL
    assert _row(f, "actor", "tuner")["config change"] == "max_num_seqs: 4 -> 8"
    assert _row(f, "severity", "page")["state"] == "firing" and _row(f, "severity", "ticket")["state"] == "resolved"
    timeline = [d for _, ds in charts(at) for d in ds if "phase" in d.columns]
    assert len(timeline) == 1
    assert sorted(timeline[0]["phase"]) == ["firing", "firing", "pending", "pending"]


@pytest.fixture
def closed_port_url() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("page", PAGES)
def test_an_unreachable_plane_is_named_on_the_page_instead_of_a_traceback(closed_port_url: str,
                                                                          open_page: OpenPage, page: str) -> None:
    at = open_page(closed_port_url, page)
    assert not at.exception
    assert len(at.error) == 1 and f"cannot reach the control plane at {closed_port_url}" in at.error[0].value
    assert len(at.title) == 1


@pytest.mark.parametrize("page", PAGES)
def test_an_older_plane_without_the_endpoints_degrades_to_a_message(open_page: OpenPage, page: str) -> None:
    older = FastAPI()
    older.get("/healthz")(lambda: {"status": "ok"})
    with serve_app(older) as url:
        at = open_page(url, page)
    assert not at.exception and not at.error
    assert any("not available from this plane" in i.value for i in at.info)


def test_tables_never_show_a_missing_reading_as_zero_or_nan(plane: tuple[str, Seeded], open_page: OpenPage) -> None:
    for page in PAGES:
        at = open_page(plane[0], page)
        shown = cells(at)
        assert not {"nan", "NaN", "None", "<NA>"} & shown, (page, shown & {"nan", "NaN", "None", "<NA>"})
