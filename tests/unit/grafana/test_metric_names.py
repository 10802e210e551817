"""Every metric name a dashboard reads is one that something really exposes.

Sources: vLLM 0.32's /metrics as recorded (tests/fixtures/vllm_0.32_metrics.txt), dcgm-exporter as recorded
(tests/fixtures/dcgm_*.txt) and the plane's own collectors rendered by prometheus_client. The integration test
tests/integration/test_prometheus_real.py does the same against a real vLLM and a real plane.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from controlplane import names
from controlplane.cost import CostCollector, Usage
from controlplane.coverage import Coverage, SpanCoverageCollector
from controlplane.engines.sim_metrics import SimTelemetry
from controlplane.grafana.dashboards import dashboards
from controlplane.slo.export import SloCollector
from controlplane.slo.options import RuleOptions
from controlplane.supervisor.policy import READY
from controlplane.supervisor.supervisor import SupervisorMetrics
from controlplane.tuning.loop import Tuner, TunerOptions
from tests.unit.grafana.exposition import exposed_names

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
SPECS = dashboards(RuleOptions(cost_budget_per_million_tokens_usd=5.0))


def vllm_names() -> set[str]:
    return exposed_names((FIXTURES / "vllm_0.32_metrics.txt").read_text())


def dcgm_names() -> set[str]:
    return set().union(*(exposed_names(p.read_text()) for p in sorted(FIXTURES.glob("dcgm_*.txt"))))


def _usage(edges: np.ndarray) -> list[Usage]:
    """One deployment up the whole cost window at $2/hour, with tokens: both cost series have a value."""
    one = np.array([edges[-1] - edges[0]])
    return [Usage("tiny", 2.0, edges, one, np.array([5e5]), np.array([5e5]), np.zeros(1))]


def plane_names() -> set[str]:
    """The plane's collectors (as plane.py registers them) rendered by prometheus_client: one ready replica,
    one tuner decision, one deployment with a cost, one replica's span coverage; the SLO families with no SLO
    yet."""
    member = SimpleNamespace(state=READY, name="tiny-0", restarts=1, canary=False)
    runtime = SimpleNamespace(dep=SimpleNamespace(name="tiny"), desired=1, members={"tiny-0": member})
    fleet = SimpleNamespace(runtimes={"tiny": runtime}, router=SimpleNamespace(outstanding=lambda name: 2))
    tuner = Tuner(fleet, None, None, None, [], TunerOptions())  # type: ignore[arg-type]
    tuner.decisions[("tiny", "scale_up", "slo_at_risk")] = 1
    registry = CollectorRegistry()
    registry.register(SupervisorMetrics(fleet))  # type: ignore[arg-type]
    registry.register(tuner)
    registry.register(CostCollector(_usage, window_s=300))
    registry.register(SloCollector(lambda: [], lambda: {}))
    registry.register(SpanCoverageCollector(lambda since, until: {"tiny-0": Coverage(200, 199, "tiny")}))
    return exposed_names(generate_latest(registry).decode())


def sim_engine_names() -> set[str]:
    """The simulated engine's own series (it exposes vLLM's too, and marks itself simulated)."""
    sim = SimTelemetry(served_name="tiny", model="Llama-3.1-8B", accelerator="H100-80GB",
                       cache_info={"block_size": "16", "num_gpu_blocks": "100"})
    return exposed_names(sim.render().decode())


def used(prefix: str) -> set[str]:
    return {n for spec in SPECS for n in spec.metric_names() if n.startswith(prefix)}


def test_every_vllm_name_is_in_vllm_032s_own_metrics() -> None:
    wanted = used(names.VLLM_PREFIX)
    assert len(wanted) >= 14
    assert wanted - vllm_names() == set()


def test_every_dcgm_name_is_exported_by_dcgm_exporter() -> None:
    wanted = used("DCGM_")
    assert len(wanted) >= 10
    assert wanted - dcgm_names() == set()


def test_every_plane_name_is_in_the_plane_registry() -> None:
    wanted = used("controlplane_")
    assert len(wanted) >= 15
    assert wanted - plane_names() - sim_engine_names() == set()
    assert names.SIM_ENGINE_INFO in wanted  # the fleet dashboard says which replicas are simulated


def test_dashboards_read_no_name_from_anywhere_else() -> None:
    every = {n for spec in SPECS for n in spec.metric_names()}
    assert every - used(names.VLLM_PREFIX) - used("DCGM_") - used("controlplane_") == set()


@pytest.mark.parametrize("name", ["vllm:time_to_first_token_seconds_bucket", "vllm:num_preemptions_total",
                                  "controlplane_replica_restarts_total", "controlplane_slo_burn_rate"])
def test_the_sources_are_read_as_prometheus_stores_them(name: str) -> None:
    assert name in vllm_names() | plane_names()


def test_a_renamed_vllm_metric_would_be_caught() -> None:
    assert "vllm:gpu_cache_usage_perc" not in vllm_names()  # the pre-0.12 name: a dashboard using it would fail
    assert "vllm:time_to_first_token_seconds" not in vllm_names()  # histograms are only _bucket/_sum/_count


def test_exposed_names_keeps_names_as_exposed_and_derives_those_of_empty_families() -> None:
    text = """# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter
DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu="0"} 5
# TYPE controlplane_replica_restarts counter
# TYPE controlplane_slo_burn_rate gauge
# TYPE vllm:e2e_request_latency_seconds histogram
# TYPE vllm:num_preemptions counter
vllm:num_preemptions_total{engine="0"} 0.0
"""
    assert exposed_names(text) == {
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "controlplane_replica_restarts_total", "controlplane_slo_burn_rate",
        "vllm:e2e_request_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_sum",
        "vllm:e2e_request_latency_seconds_count", "vllm:num_preemptions_total"}
