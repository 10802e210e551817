"""compose.yaml checked without a Docker engine: every file it mounts exists, every URL between services names a
service and a port that service listens on, the configs it mounts pass the real promtool / amtool (paths resolved
as mounted), ports are published on loopback only, and the plane, Prometheus and Grafana agree on names."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from controlplane.grafana import render as grafana
from controlplane.slo.spec import load_slos
from controlplane.supervisor.spec import ExternalBackend, load_deployment

REPO = Path(__file__).resolve().parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((REPO / "compose.yaml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
INTERPOLATION = re.compile(r"\$\{(\w+)(?::?[-?][^}]*)?\}")


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` with the environment of a fresh checkout: the default, or a placeholder."""
    def one(m: re.Match[str]) -> str:
        default = re.match(r"\$\{\w+:-([^}]*)\}", m.group(0))
        return default.group(1) if default else f"<{m.group(1)}>"
    return INTERPOLATION.sub(one, value)


def env(service: str) -> dict[str, str]:
    return {k: interpolate(str(v)) for k, v in SERVICES[service].get("environment", {}).items()}


def args(service: str) -> list[str]:
    return [interpolate(str(a)) for a in SERVICES[service].get("command", [])]


def flag(service: str, name: str) -> str:
    values = [a.split("=", 1)[1] for a in args(service) if a.startswith(f"--{name}=")]
    assert len(values) == 1, f"{service}: expected one --{name}=..., got {values}"
    return values[0]


def mounts(service: str) -> dict[str, Path]:
    """Container path -> host path of the service's bind mounts (named volumes left out)."""
    out = {}
    for spec in SERVICES[service].get("volumes", []):
        source, target = spec.split(":")[:2]
        if source.startswith("."):
            out[target] = (REPO / source).resolve()
    return out


def host_path(service: str, container_path: str) -> Path:
    """Where a path inside the service's container comes from on this checkout (the longest mount prefix)."""
    for target, source in sorted(mounts(service).items(), key=lambda kv: -len(kv[0])):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return source / os.path.relpath(container_path, target)
    raise AssertionError(f"{service}: {container_path} is not inside any bind mount of the service")


def listens(service: str) -> set[int]:
    """Container ports the service offers on the compose network (`expose` plus the container side of `ports`)."""
    ports = {int(p) for p in SERVICES[service].get("expose", [])}
    ports |= {int(str(p).rsplit(":", 1)[1].split("/")[0]) for p in SERVICES[service].get("ports", [])}
    return ports


def assert_reaches(url_or_hostport: str, where: str) -> tuple[str, int]:
    """A URL (or host:port) used inside the network names a service and a port that service listens on."""
    parts = urlsplit(url_or_hostport if "//" in url_or_hostport else f"//{url_or_hostport}")
    host, port = parts.hostname, parts.port
    assert host in SERVICES, f"{where}: {url_or_hostport} names no service (services: {sorted(SERVICES)})"
    assert port in listens(host), f"{where}: {url_or_hostport}: {host} listens on {sorted(listens(host))}"
    return host, port


def prometheus_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(host_path("prometheus", flag("prometheus", "config.file")).read_text())
    return config


def datasource() -> dict[str, Any]:
    provisioning = host_path("grafana", "/etc/grafana/provisioning")
    data = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    source: dict[str, Any] = data["datasources"][0]
    return source


def test_the_stack_has_every_service() -> None:
    assert set(SERVICES) == {"vllm", "dcgm-exporter", "prometheus", "alertmanager", "grafana", "postgres", "plane",
                             "streamlit"}


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_bind_mounted_file_exists(service: str) -> None:
    for target, source in mounts(service).items():
        assert source.exists(), f"{service}: {source} (mounted at {target}) does not exist"
        assert REPO in source.parents, f"{service}: {source} is outside the repository"


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_ports_are_published_on_loopback_only(service: str) -> None:
    for p in SERVICES[service].get("ports", []):
        assert str(p).startswith("127.0.0.1:"), f"{service}: {p} would listen on every interface of the host"


def test_vllm_and_dcgm_exporter_reserve_the_gpus() -> None:
    assert SERVICES["vllm"]["image"].startswith("vllm/vllm-openai:")
    for service in ("vllm", "dcgm-exporter"):
        devices = SERVICES[service]["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), service


def test_vllm_listens_where_prometheus_scrapes_it_and_sends_traces_to_the_plane() -> None:
    assert int(flag("vllm", "port")) in listens("vllm")
    assert flag("vllm", "host") == "0.0.0.0"
    host, port = assert_reaches(flag("vllm", "otlp-traces-endpoint"), "vllm --otlp-traces-endpoint")
    assert (host, str(port)) == ("plane", env("plane")["CONTROLPLANE_OTLP_GRPC_PORT"])
    assert env("vllm")["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "grpc"


def test_every_prometheus_target_and_its_alertmanager_are_services_on_their_ports() -> None:
    config = prometheus_config()
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"vllm", "controlplane", "dcgm"} <= set(jobs)
    for name, job in jobs.items():
        for static in job["static_configs"]:
            for target in static["targets"]:
                if name != "prometheus":  # its own localhost target
                    assert_reaches(target, f"prometheus.yml job {name}")
    assert [assert_reaches(t, "prometheus.yml alerting")[0] for am in config["alerting"]["alertmanagers"]
            for sc in am["static_configs"] for t in sc["targets"]] == ["alertmanager"]
    assert jobs["controlplane"]["static_configs"][0]["targets"] == [f"plane:{env('plane')['CONTROLPLANE_API_PORT']}"]


def test_vllm_series_carry_the_deployment_and_replica_names_the_plane_and_the_slos_use() -> None:
    deployment = load_deployment(host_path("plane", args("plane")[args("plane").index("--config") + 1]))
    assert isinstance(deployment.backend, ExternalBackend)
    assert [assert_reaches(u, "deployment.yaml")[0] for u in deployment.backend.urls] == ["vllm"]
    labels = next(job for job in prometheus_config()["scrape_configs"]
                  if job["job_name"] == "vllm")["static_configs"][0]["labels"]
    assert labels == {"deployment": deployment.name, "replica": f"{deployment.name}-0"}
    assert env("vllm")["OTEL_RESOURCE_ATTRIBUTES"] == f"controlplane.replica={deployment.name}-0"
    slos = load_slos(host_path("plane", args("plane")[args("plane").index("--slo") + 1]))
    assert slos and {s.deployment for s in slos} == {deployment.name}


def test_the_plane_uses_postgres_and_alertmanager_and_dcgm_by_service_name() -> None:
    e = env("plane")
    assert args("plane")[:2] == ["controlplane", "up"] and e["CONTROLPLANE_BIND_HOST"] == "0.0.0.0"
    db = urlsplit(e["CONTROLPLANE_DATABASE_URL"])
    assert db.scheme.startswith("postgresql") and assert_reaches(f"{db.hostname}:{db.port}", "database")[0] == \
        "postgres"
    assert (db.username, db.path.lstrip("/")) == (env("postgres")["POSTGRES_USER"], env("postgres")["POSTGRES_DB"])
    assert db.password == env("postgres")["POSTGRES_PASSWORD"]
    assert assert_reaches(e["CONTROLPLANE_ALERTMANAGER_URL"], "plane alertmanager")[0] == "alertmanager"
    assert assert_reaches(e["CONTROLPLANE_DCGM_URL"], "plane dcgm")[0] == "dcgm-exporter"
    for port in ("CONTROLPLANE_API_PORT", "CONTROLPLANE_ROUTER_PORT", "CONTROLPLANE_OTLP_GRPC_PORT",
                 "CONTROLPLANE_OTLP_HTTP_PORT"):
        assert int(e[port]) in listens("plane"), port
    assert "postgres" in SERVICES["plane"]["depends_on"]


def test_the_streamlit_app_reads_the_plane_api() -> None:
    assert args("streamlit")[:3] == ["streamlit", "run", "dashboards/app.py"]
    assert host_path("streamlit", "/app/dashboards/app.py").is_file()
    assert assert_reaches(env("streamlit")["CONTROLPLANE_API_URL"], "streamlit")[0] == "plane"
    assert env("streamlit")["CONTROLPLANE_API_URL"] == f"http://plane:{env('plane')['CONTROLPLANE_API_PORT']}"


def test_the_plane_image_is_built_from_a_dockerfile_that_installs_the_package() -> None:
    build = SERVICES["plane"]["build"]
    dockerfile = REPO / build["context"] / build["dockerfile"]
    assert "pip install ." in dockerfile.read_text()
    assert (dockerfile.parent / f"{dockerfile.name}.dockerignore").is_file()  # never send .venv to the builder
    assert SERVICES["streamlit"]["image"] == SERVICES["plane"]["image"]


def test_grafana_provisions_the_generated_dashboards_and_a_datasource_at_prometheus() -> None:
    provider = yaml.safe_load((host_path("grafana", "/etc/grafana/provisioning") / "dashboards" /
                               "controlplane.yaml").read_text())["providers"][0]
    boards = host_path("grafana", provider["options"]["path"])
    assert boards == REPO / "dashboards" / "grafana" / "dashboards"
    assert len(list(boards.glob("*.json"))) == 5
    source = datasource()
    assert assert_reaches(source["url"], "grafana datasource")[0] == "prometheus"
    assert int(flag("prometheus", "web.listen-address").rsplit(":", 1)[1]) == urlsplit(source["url"]).port
    assert source["uid"] == grafana.DATASOURCE_UID and source["type"] == "prometheus"


def test_grafana_rate_interval_matches_the_scrape_interval() -> None:
    assert datasource()["jsonData"]["timeInterval"] == prometheus_config()["global"]["scrape_interval"]


def test_prometheus_keeps_data_for_the_longest_slo_window() -> None:
    from controlplane.slo.durations import parse_duration_s

    slos = load_slos(REPO / "alerts" / "slos")
    retention = parse_duration_s(flag("prometheus", "storage.tsdb.retention.time"))
    assert retention > max(s.window.duration_s for s in slos)


def test_promtool_accepts_the_prometheus_config_with_the_rule_files_as_mounted(
        prometheus_tools: dict[str, str], tmp_path: Path) -> None:
    config = prometheus_config()
    rule_globs = [str(host_path("prometheus", pattern)) for pattern in config["rule_files"]]
    matched = [p for pattern in rule_globs for p in Path("/").glob(pattern.lstrip("/"))]
    assert len(matched) >= 6, f"rule_files {config['rule_files']} match {matched} through the mounts"
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump({**config, "rule_files": rule_globs}, sort_keys=False))
    result = subprocess.run([prometheus_tools["promtool"], "check", "config", str(local)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(matched)} rule files found" in result.stdout
    assert all(f"Checking {p}" in result.stdout for p in matched)


def test_promtool_rejects_a_rule_file_path_that_is_not_mounted(prometheus_tools: dict[str, str],
                                                               tmp_path: Path) -> None:
    broken = tmp_path / "broken.rules.yaml"
    broken.write_text("groups:\n- name: x\n  rules:\n  - record: x\n    expr: sum(\n")
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump({**prometheus_config(), "rule_files": [str(broken)]}))
    result = subprocess.run([prometheus_tools["promtool"], "check", "config", str(local)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0


def test_amtool_accepts_the_alertmanager_config_as_mounted(prometheus_tools: dict[str, str]) -> None:
    config = host_path("alertmanager", flag("alertmanager", "config.file"))
    assert config == REPO / "alerts" / "alertmanager.yml"
    result = subprocess.run([prometheus_tools["amtool"], "check-config", str(config)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (Debian package) not installed")
def test_docker_compose_validates_the_file_against_the_compose_schema() -> None:
    result = subprocess.run(["docker-compose", "-f", str(REPO / "compose.yaml"), "config", "--quiet"],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "CONTROLPLANE_API_TOKEN": "test-token"})
    assert result.returncode == 0, result.stdout + result.stderr
