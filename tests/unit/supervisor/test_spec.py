"""The Deployment spec: a good file loads; a bad one fails before anything starts, naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controlplane.cost import price_per_replica_hour
from controlplane.engines.vllm_server import SimulatedEngine
from controlplane.supervisor.spec import EngineConfig, SpecError, load_deployment, parse_deployment
from controlplane.tuning import catalog


def doc(**spec: Any) -> dict[str, Any]:
    body = {"model": {"path": "/models/llama", "served_name": "llama"}, **spec}
    return {"apiVersion": "controlplane/v1", "kind": "Deployment", "metadata": {"name": "chat"}, "spec": body}


def test_a_full_spec_loads_into_the_domain_object(tmp_path: Path) -> None:
    path = tmp_path / "d.yaml"
    path.write_text("""
apiVersion: controlplane/v1
kind: Deployment
metadata: {name: chat}
spec:
  model: {path: /models/llama, served_name: llama-8b}
  engine: {max_num_seqs: 128, max_num_batched_tokens: 8192, kv_cache_dtype: fp8, quantization: fp8,
           gpu_memory_utilization: 0.9, tensor_parallel_size: 2, extra_args: ["--enable-prefix-caching"]}
  replicas: {min: 1, max: 4, initial: 2}
  hardware: {accelerator: H100-80GB, count_per_replica: 2, price_per_hour_usd: 3.5}
  backend: {kind: ray, address: "10.0.0.1:6379"}
""")
    d = load_deployment(path)
    assert (d.name, d.served_name, d.initial_replicas, d.max_replicas) == ("chat", "llama-8b", 2, 4)
    assert d.price_per_replica_hour_usd == 7.0
    assert d.backend.kind == "ray"
    assert d.engine.vllm_args() == [
        "--max-num-seqs", "128", "--max-num-batched-tokens", "8192", "--gpu-memory-utilization", "0.9",
        "--quantization", "fp8", "--kv-cache-dtype", "fp8", "--tensor-parallel-size", "2",
        "--enable-prefix-caching"]


@pytest.mark.parametrize(("spec", "needle"), [
    ({"engine": {"max_num_seq": 4}}, "spec.engine.max_num_seq: unknown field"),
    ({"engine": {"max_num_seqs": 0}}, "spec.engine.max_num_seqs: Input should be greater than or equal to 1"),
    ({"engine": {"kv_cache_dtype": "fp4"}}, "spec.engine.kv_cache_dtype"),
    ({"replicas": {"min": 3, "max": 2}}, "min (3) must be <= max (2)"),
    ({"replicas": {"min": 1, "max": 2, "initial": 5}}, "initial (5) must lie in [min, max] = [1, 2]"),
    ({"backend": {"kind": "kubernetes"}}, "spec.backend"),
    ({"backend": {"kind": "external", "urls": ["not-a-url"]}}, "is not an http(s) URL"),
    ({"backend": {"kind": "external", "urls": ["http://10.0.0.5:8000x"]}}, "is not an http(s) URL"),
    ({"engine": {"extra_args": ["--port", "9"]}}, "--port is set by the plane"),
    ({"backend": {"kind": "local", "cpu_cores": [[0], []]}}, "every core set needs at least one core"),
    ({"hardware": {"price_per_hour_usd": float("inf")}}, "spec.hardware.price_per_hour_usd"),
    ({"hardware": {"count_per_replica": float("nan")}}, "spec.hardware.count_per_replica"),
    ({"lifecycle": {"ready_timeout_s": float("inf")}}, "spec.lifecycle.ready_timeout_s"),
    ({"lifecycle": {"probe_interval_s": 1e-300}}, "spec.lifecycle.probe_interval_s"),
    ({"replicas": {"max": 10**30}}, "spec.replicas.max"),
])
def test_a_bad_spec_names_the_field_and_what_is_allowed(spec: dict[str, Any], needle: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_deployment(doc(**spec), "deploy.yaml")
    assert needle in str(err.value)
    assert str(err.value).startswith("deploy.yaml")


def test_wrong_kind_and_missing_model_are_reported_together() -> None:
    bad = {"apiVersion": "controlplane/v1", "kind": "SLO", "metadata": {"name": "Bad Name"}, "spec": {}}
    with pytest.raises(SpecError) as err:
        parse_deployment(bad)
    text = str(err.value)
    assert "kind" in text and "metadata.name" in text and "spec.model" in text


def test_unreadable_and_invalid_yaml_files_get_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read"):
        load_deployment(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("spec: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_deployment(tmp_path / "bad.yaml")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(SpecError, match="binary.yaml: not UTF-8"):
        load_deployment(tmp_path / "binary.yaml")


def test_external_replicas_count_is_the_number_of_urls() -> None:
    d = parse_deployment(doc(backend={"kind": "external", "urls": ["http://a:8000", "http://b:8000"]}))
    assert d.initial_replicas == 2
    # The plane starts nothing of an external deployment: no model path is needed (a local one still is).
    pathless = doc(backend={"kind": "external", "urls": ["http://a:8000"]}, model={"served_name": "llama"})
    assert parse_deployment(pathless).served_name == "llama"
    with pytest.raises(SpecError, match="spec.model.path: required"):
        parse_deployment(doc(model={"served_name": "llama"}))


def test_engine_changes_are_validated_like_the_spec() -> None:
    base = EngineConfig(max_num_seqs=8)
    assert base.with_changes({"max_num_seqs": 2}).max_num_seqs == 2
    with pytest.raises(SpecError, match="max_num_seqs"):
        base.with_changes({"max_num_seqs": -1})
    with pytest.raises(SpecError, match="unknown field"):
        base.with_changes({"max_num_seq": 2})
    assert EngineConfig.from_dict(base.as_dict()) == base


@pytest.mark.parametrize(("extra", "on"), [((), True), (("--no-enable-prefix-caching",), False),
                                           (("--enable-prefix-caching",), True),
                                           (("--no-enable-prefix-caching", "--enable-prefix-caching"), True),
                                           (("--enable-prefix-caching", "--seed", "1", "--no-enable-prefix-caching"),
                                            False), (("--no_enable_prefix_caching",), False)])
def test_prefix_caching_is_vllms_default_unless_the_last_flag_turns_it_off(extra: tuple[str, ...], on: bool) -> None:
    assert EngineConfig(extra_args=extra).prefix_caching is on


# --- the simulated engine --------------------------------------------------------------------------------------
def sim_doc(**spec: Any) -> dict[str, Any]:
    body = {"model": {"served_name": "llama-8b"}, "simulated": {"model": "meta-llama/Llama-3.1-8B-Instruct"},
            "hardware": {"accelerator": "h100"}, **spec}
    return {"apiVersion": "controlplane/v1", "kind": "Deployment", "metadata": {"name": "sim"}, "spec": body}


def test_a_simulated_spec_needs_no_model_path_and_names_its_engine_as_the_catalog_does() -> None:
    d = parse_deployment(sim_doc(simulated={"model": "meta-llama/Llama-3.1-8B-Instruct", "speedup": 2}))
    assert d.simulated == SimulatedEngine("Llama-3.1-8B", "H100-80GB", 2.0)
    assert d.accelerator == "H100-80GB" and d.model_path == ""


def test_a_simulated_spec_without_a_price_gets_the_catalogs_and_the_stored_spec_carries_it() -> None:
    d = parse_deployment(sim_doc(engine={"tensor_parallel_size": 2}))
    h100 = catalog.accelerator("H100-80GB").usd_per_hour
    # Two GPUs per replica (the tensor-parallel size, as count_per_replica is not given), each at the catalog price.
    assert d.price_per_replica_hour_usd == pytest.approx(2 * h100)
    assert price_per_replica_hour(d.spec) == pytest.approx(2 * h100)  # what the cost API reads from the store
    given = parse_deployment(sim_doc(hardware={"accelerator": "L4", "price_per_hour_usd": 0.5,
                                               "count_per_replica": 1}))
    assert (given.accelerator, given.price_per_replica_hour_usd) == ("L4", 0.5)


def test_a_vllm_spec_still_needs_its_model_path_and_stores_no_simulated_section() -> None:
    with pytest.raises(SpecError, match=r"deploy.yaml: spec.model.path: required .* unless the deployment is simul"):
        parse_deployment({**doc(), "spec": {"model": {"served_name": "llama"}}}, "deploy.yaml")
    d = parse_deployment(doc())
    assert d.simulated is None and "simulated" not in d.spec["spec"]
    assert d.price_per_replica_hour_usd == 0.0  # no catalog default for vLLM: the price stays unconfigured


@pytest.mark.parametrize(("spec", "needle"), [
    ({"simulated": {"model": "gpt-5"}},
     "spec.simulated.model: unknown model 'gpt-5'; known: Llama-3.1-8B, Llama-3.1-70B, Qwen2.5-7B"),
    ({"hardware": {"accelerator": "cpu"}},
     "spec.hardware.accelerator: the simulated engine needs a catalog accelerator: unknown accelerator 'cpu'; "
     "known: H100-80GB, H200, A100-80GB, L40S, L4, A10G"),
    ({"simulated": {"model": "Llama-3.1-8B", "speedup": 0}}, "spec.simulated.speedup: Input should be greater than"),
    ({"simulated": {"model": "Llama-3.1-8B", "accelerator": "H100"}}, "spec.simulated.accelerator: unknown field"),
    ({"engine": {"dtype": "float32"}}, "spec.engine: the simulated engine refuses it: argument --dtype"),
    ({"engine": {"pipeline_parallel_size": 2}}, "the simulated engine refuses it: argument --pipeline-parallel-size"),
    ({"engine": {"extra_args": ["--no-such-flag"]}},
     "the simulated engine refuses it: unrecognized arguments: --no-such-flag"),
    ({"engine": {"max_model_len": 1_000_000}}, "max_model_len 1000000 exceeds the KV cache's"),
    ({"backend": {"kind": "external", "urls": ["http://a:8000"]}},
     "spec.simulated: the external backend runs replicas the plane does not start"),
    ({"backend": {"kind": "ray", "num_gpus_per_replica": 1}},
     "spec.backend.num_gpus_per_replica: the simulated engine uses no GPU"),
])
def test_a_bad_simulated_spec_names_the_field_and_what_is_allowed(spec: dict[str, Any], needle: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_deployment(sim_doc(**spec), "sim.yaml")
    assert needle in str(err.value)
    assert str(err.value).startswith("sim.yaml")


def test_a_simulated_deployment_runs_on_ray_without_gpus_and_takes_the_flags_the_engine_accepts() -> None:
    d = parse_deployment(sim_doc(backend={"kind": "ray", "num_gpus_per_replica": 0},
                                 engine={"kv_cache_dtype": "fp8", "quantization": "fp8",
                                         "extra_args": ["--enable-prefix-caching"]}))
    assert d.backend.kind == "ray" and d.simulated is not None


def _named(name: str, **spec: Any) -> Any:
    d = doc(**spec)
    d["metadata"]["name"] = name
    return parse_deployment(d)


def test_deployments_whose_replica_ports_would_collide_are_named_with_their_ranges() -> None:
    from controlplane.supervisor.spec import port_conflicts
    llama = _named("llama", replicas={"min": 1, "max": 3, "initial": 1})  # ports 8100-8103 (3 + the surge slot)
    qwen = _named("qwen")
    (clash,) = port_conflicts([llama, qwen])
    assert "llama (ports 8100-8103) and qwen (ports 8100-8101)" in clash and "base_port" in clash
    apart = _named("qwen", backend={"kind": "local", "base_port": 8104})
    assert port_conflicts([llama, apart]) == []
    touching = _named("qwen", backend={"kind": "local", "base_port": 8103})
    assert len(port_conflicts([llama, touching])) == 1
    ray_a = _named("a", backend={"kind": "ray", "address": "10.0.0.1:6379"})
    ray_b = _named("b", backend={"kind": "ray", "address": "10.0.0.2:6379"})
    # The plane joins one Ray cluster (the first deployment's address): both run there, on 8200-8201.
    (ray,) = port_conflicts([ray_a, ray_b, llama])
    assert "a (ports 8200-8201) and b (ports 8200-8201) overlap on the Ray cluster" in ray
    ray_c = _named("c", backend={"kind": "ray", "base_port": 8202})
    assert port_conflicts([ray_a, ray_c, llama]) == []
    (plane,) = port_conflicts([_named("x", backend={"kind": "local", "base_port": 8079})], {"API": 8080})
    assert "takes the API port 8080" in plane


@pytest.mark.parametrize(("changes", "says"), [
    ({"max_num_seqs": True}, "must be a number, not bool"),  # lax pydantic read it as 1
    ({"max_num_seqs": "8"}, "must be a number, not str"),
    ({"gpu_memory_utilization": "0.5"}, "must be a number, not str"),
    ({"max_model_len": 10**30}, "less than or equal to 16777216"),
    ({"kv_cache_space_gib": 10**9}, "less than or equal to 65536"),
    ({"num_gpu_blocks_override": 10**12}, "less than or equal to 16777216"),
])
def test_a_posted_engine_change_must_be_a_number_in_bounds(changes: dict[str, object], says: str) -> None:
    with pytest.raises(SpecError, match=says):
        EngineConfig(max_num_seqs=8).with_changes(changes)
    assert EngineConfig(max_num_seqs=8).with_changes({"max_num_seqs": 16.0}).max_num_seqs == 16  # a whole float


def _gpu_doc(**spec: object) -> dict[str, object]:
    body: dict[str, object] = {"model": {"path": "/m", "served_name": "x"}, "engine": {"tensor_parallel_size": 4},
                               "hardware": {"accelerator": "H100-80GB", "price_per_hour_usd": 2.0}}
    return {"apiVersion": "controlplane/v1", "kind": "Deployment", "metadata": {"name": "x"}, "spec": {**body, **spec}}


def test_a_tensor_parallel_vllm_replica_is_priced_as_the_gpus_it_holds_unless_told() -> None:
    dep = parse_deployment(_gpu_doc())
    assert dep.accelerators_per_replica == 4 and dep.price_per_replica_hour_usd == pytest.approx(8.0)
    assert dep.spec["spec"]["hardware"]["count_per_replica"] == 4  # stored, so the cost figures use it
    told = parse_deployment(_gpu_doc(hardware={"accelerator": "H100-80GB", "count_per_replica": 2}))
    assert told.accelerators_per_replica == 2
    assert parse_deployment(_gpu_doc(hardware={"accelerator": "cpu"})).accelerators_per_replica == 1  # cores


def test_a_ray_actor_must_reserve_the_gpus_vllm_will_use() -> None:
    with pytest.raises(SpecError, match=r"num_gpus_per_replica: vLLM uses .* = 4 GPUs per replica, but the actor "
                                        r"reserves 1; reserve 4"):
        parse_deployment(_gpu_doc(backend={"kind": "ray", "num_gpus_per_replica": 1}))
    assert parse_deployment(_gpu_doc(backend={"kind": "ray", "num_gpus_per_replica": 4})).accelerators_per_replica == 4
    assert parse_deployment(_gpu_doc(backend={"kind": "ray"})).accelerators_per_replica == 4  # 0: vLLM places
