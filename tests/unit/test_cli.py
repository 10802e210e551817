import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controlplane.cli import app
from controlplane.engines.tiny_model import TinyModelSpec, make_tiny_model
from controlplane.settings import Settings

runner = CliRunner()


def test_a_bad_watch_url_is_a_clear_error_not_a_traceback() -> None:
    result = runner.invoke(app, ["up", "--watch", "localhost:8000"])
    assert result.exit_code == 2
    assert "expected an http(s) URL" in result.output and "Traceback" not in result.output


def test_a_bad_setting_names_the_environment_variable(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("CONTROLPLANE_API_PORT", "99999")
    result = runner.invoke(app, ["db", "upgrade"])
    assert result.exit_code == 2 and "CONTROLPLANE_API_PORT" in result.output


def test_settings_come_from_controlplane_environment_variables(monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("CONTROLPLANE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CONTROLPLANE_SCRAPE_INTERVAL_S", "0.5")
    s = Settings()
    assert s.scrape_interval_s == 0.5 and s.bind_host == "127.0.0.1"
    assert s.resolved_database_url() == f"sqlite:///{tmp_path / 'controlplane.db'}"


def test_db_upgrade_creates_the_store(monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("CONTROLPLANE_DATA_DIR", str(tmp_path))
    result = runner.invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0 and (tmp_path / "controlplane.db").exists()


def test_the_tiny_model_is_deterministic_for_a_seed_and_reused(tmp_path: Path) -> None:
    spec = TinyModelSpec(seed=3, corpus_sentences=2000, vocab_size=600, hidden_size=64, intermediate_size=128)
    a, built_a = make_tiny_model(tmp_path / "a", spec)
    b, _ = make_tiny_model(tmp_path / "b", spec)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    _, built_again = make_tiny_model(tmp_path / "a", spec)
    assert built_a and not built_again
    other, _ = make_tiny_model(tmp_path / "c", TinyModelSpec(**{**spec.__dict__, "seed": 4}))
    assert (other / "model.safetensors").read_bytes() != (a / "model.safetensors").read_bytes()
    assert json.loads((a / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_the_cli_entry_point_is_installed() -> None:
    out = subprocess.run([str(Path(sys.executable).parent / "controlplane"), "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "make-tiny" not in out and "model" in out and "up" in out


def test_tune_what_if_flag_form_runs_the_what_if_command() -> None:
    from controlplane.cli import spelled_as_subcommands

    argv = ["tune", "--what-if", "--requests", "200", "--rate", "4", "--json"]
    assert spelled_as_subcommands(argv) == ["tune", "what-if", "--requests", "200", "--rate", "4", "--json"]
    assert spelled_as_subcommands(["tune", "what-if"]) == ["tune", "what-if"]
    late = ["tune", "--requests", "200", "--what-if"]  # the flag after other options
    assert spelled_as_subcommands(late) == ["tune", "what-if", "--requests", "200"]
    assert spelled_as_subcommands(["up", "--what-if"]) == ["up", "--what-if"]  # only tune's flag is rewritten
    result = runner.invoke(app, spelled_as_subcommands(argv))
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["model"] == "Llama-3.1-8B"


def _search_api(result: dict[str, object], status: str = "done") -> object:
    """A plane's search endpoints that answer one finished search (FastAPI, served for real by the test)."""
    from fastapi import FastAPI, Header, HTTPException

    api = FastAPI()

    @api.post("/api/v1/deployments/{name}/search", status_code=202)
    def start(name: str, authorization: str = Header("")) -> dict[str, object]:
        if authorization != "Bearer t0k":
            raise HTTPException(401, detail="missing or wrong bearer token")
        if name != "tiny":
            raise HTTPException(404, detail="unknown deployment 'nope'; known: tiny")
        return {"id": 1, "status": "running", "progress": []}

    @api.get("/api/v1/searches/1")
    def get() -> dict[str, object]:
        return {"id": 1, "status": status, "error": "tiny-0 recorded 3 requests" if status == "failed" else None,
                "progress": [{"unix_s": 0, "line": "searching 9 configurations"}], "result": result}

    return api


EVIDENCE = {"target_rps": 5.0, "engine": {"max_num_seqs": 4, "max_num_batched_tokens": 1024, "quantization": None},
            "replicas": 1, "capacity_rps_per_replica": 55.8, "usd_per_hour": 0.05,
            "current": {"engine": {"max_num_seqs": 2, "max_num_batched_tokens": 2048, "quantization": None},
                        "replicas": 2, "replicas_needed": 1, "capacity_rps_per_replica": 29.6,
                        "usd_per_hour": 0.1, "usd_per_hour_needed": 0.05}}


@pytest.mark.parametrize(("args", "message"), [
    (["--window-s", "nan"], "--window-s nan: allowed"),
    (["--target-rps", "inf"], "--target-rps inf: allowed"),
    (["--timeout-s", "0"], "--timeout-s 0.0: allowed"),
])
def test_tune_search_refuses_bad_flags_before_calling_the_plane(args: list[str], message: str) -> None:
    out = runner.invoke(app, ["tune", "search", "tiny", "--api", "http://127.0.0.1:9", *args])
    assert out.exit_code == 2 and message in " ".join(out.output.split()) and out.exception is not None
    assert isinstance(out.exception, SystemExit)


def test_tune_search_names_a_bad_api_url_or_setting() -> None:
    out = runner.invoke(app, ["tune", "search", "tiny", "--api", "http://[::bad"])
    assert out.exit_code == 1 and "cannot reach the plane's API at http://[::bad" in " ".join(out.output.split())
    bad = runner.invoke(app, ["tune", "search", "tiny"], env={"CONTROLPLANE_API_PORT": "abc"})
    assert bad.exit_code == 2 and "CONTROLPLANE_API_PORT: Input should be a valid integer" in " ".join(
        bad.output.split())


def test_tune_search_prints_progress_and_what_changes_and_how_it_was_applied() -> None:
    from tests.unit.ui.plane import serve_app

    result = {"outcome": "same_cost_more_headroom: seqs=4 x 1", "recommendation_id": 3, "evidence": EVIDENCE,
              "auto": {"verdict": "kept"}}
    with serve_app(_search_api(result)) as url:
        out = runner.invoke(app, ["tune", "search", "tiny", "--api", url, "--token", "t0k", "--mode", "auto"],
                            env={"COLUMNS": "200"})  # a wide table: no cell wraps
        denied = runner.invoke(app, ["tune", "search", "tiny", "--api", url, "--token", "wrong"])
        unknown = runner.invoke(app, ["tune", "search", "nope", "--api", url, "--token", "t0k"])
        tokenless = runner.invoke(app, ["tune", "search", "tiny", "--api", url], env={"CONTROLPLANE_API_TOKEN": ""})
    assert out.exit_code == 0, out.output
    # The running fleet's cost now, beside what the replicas it needs would cost.
    assert re.search(r"running .* 2 \(needs 1\) .* 29\.6 .* 0\.10 \(needs 0\.05\)", out.output), out.output
    assert re.search(r"searched .* 1 .* 55\.8 .* 0\.05", out.output), out.output
    # Without a token the API says what it needs (not "cannot reach the plane").
    assert tokenless.exit_code == 2 and "401" in tokenless.output and "cannot reach" not in tokenless.output
    assert "searching 9 configurations" in out.output and "same_cost_more_headroom" in out.output
    assert "max_num_seqs 2, max_num_batched_tokens 2048" in out.output  # only what differs
    assert "max_num_seqs 4, max_num_batched_tokens 1024" in out.output and "quantization" not in out.output
    assert "recommendation 3 was applied (auto mode): kept" in out.output
    assert denied.exit_code == 2 and "401" in denied.output and "bearer token" in denied.output
    assert unknown.exit_code == 2 and "unknown deployment" in unknown.output and "Traceback" not in unknown.output


def test_tune_search_reports_a_failed_search_and_an_unreachable_plane() -> None:
    from tests.unit.ui.plane import serve_app

    with serve_app(_search_api({}, status="failed")) as url:
        failed = runner.invoke(app, ["tune", "search", "tiny", "--api", url, "--token", "t0k"])
    assert failed.exit_code == 1 and "tiny-0 recorded 3 requests" in failed.output
    down = runner.invoke(app, ["tune", "search", "tiny", "--api", "http://127.0.0.1:9", "--token", "t0k"])
    assert down.exit_code == 1 and "cannot reach the plane's API at http://127.0.0.1:9" in down.output


def test_files_where_directories_belong_and_bad_urls_are_errors_not_tracebacks(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    slos = str(Path(__file__).resolve().parents[2] / "alerts" / "slos")
    for args in (["slo", "render", "--out", str(afile / "x"), slos], ["dashboards", "render", "--out", str(afile)]):
        out = runner.invoke(app, args)
        assert out.exit_code == 1 and "cannot write" in out.output and isinstance(out.exception, SystemExit), args
    tiny = runner.invoke(app, ["model", "make-tiny", "--out", str(afile)])
    assert tiny.exit_code == 2 and "exists and is not a directory" in " ".join(tiny.output.split())
    for url in ("ftp://x", ""):  # an empty URL is a bad one, not "not given" (the default plane's)
        ui = runner.invoke(app, ["ui", "--api-url", url])
        assert ui.exit_code == 2 and "must be an http(s) URL" in ui.output, url


def test_the_ui_reads_the_api_the_settings_describe_unless_told_otherwise(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    execs: list[list[str]] = []
    monkeypatch.setattr("os.execv", lambda _exe, argv: execs.append(list(argv)))
    monkeypatch.setenv("CONTROLPLANE_API_PORT", "9123")
    assert runner.invoke(app, ["ui"]).exit_code == 0
    assert runner.invoke(app, ["ui", "--api-url", "http://10.0.0.5:8080"]).exit_code == 0
    monkeypatch.setenv("CONTROLPLANE_BIND_HOST", "::")  # listening everywhere: reached on loopback
    assert runner.invoke(app, ["ui"]).exit_code == 0
    monkeypatch.setenv("CONTROLPLANE_API_URL", "http://plane.internal:8080")  # what the app itself reads wins
    assert runner.invoke(app, ["ui"]).exit_code == 0
    assert [a[a.index("--api-url") + 1] for a in execs] == ["http://127.0.0.1:9123", "http://10.0.0.5:8080",
                                                            "http://[::1]:9123", "http://plane.internal:8080"]
    monkeypatch.delenv("CONTROLPLANE_API_URL")
    monkeypatch.delenv("CONTROLPLANE_BIND_HOST")
    monkeypatch.setenv("CONTROLPLANE_API_PORT", "99999")  # a bad setting is named, not a traceback
    bad = runner.invoke(app, ["ui"])
    assert bad.exit_code == 2 and "CONTROLPLANE_API_PORT" in bad.output


def test_replicas_send_spans_to_an_address_they_reach() -> None:
    from controlplane.settings import Settings

    assert Settings(bind_host="0.0.0.0").replica_spans_endpoint(4317) == "127.0.0.1:4317"
    assert Settings(bind_host="::").replica_spans_endpoint(4317) == "[::1]:4317"  # not ':::4317'
    assert Settings(bind_host="fd00::5").local_url(8080) == "http://[fd00::5]:8080"
    assert Settings(bind_host="").local_address(4317) == "127.0.0.1:4317"
    assert Settings(bind_host="[::1]").local_address(4317) == "[::1]:4317"
    for ok in ("10.0.0.5:4317", "plane.internal:4317", "[fd00::5]:4317", "grpc://10.0.0.5:4317"):
        assert Settings(replica_otlp_endpoint=ok, bind_host="0.0.0.0").replica_spans_endpoint(4317) == ok
    # https (the exporter would use TLS), a bare IPv6 literal (read as a host on port 443), no port, a port out of
    # range, a broken bracket, digits gRPC cannot read, a zone id: each refused with what is allowed
    for bad in ("https://plane:4317", "fd00::5:4317", "10.0.0.5", "10.0.0.5:0", "10.0.0.5:70000", "[::1:4317",
                "[fd00::zz]:4317", "10.0.0.5:\u0664\u0663\u0661\u0667", "[fe80::1%eth0]:4317"):
        with pytest.raises(ValueError, match="replica_otlp_endpoint") as err:
            Settings(replica_otlp_endpoint=bad)
        assert "host:port" in str(err.value) or "port" in str(err.value), bad


def test_spans_sent_off_host_to_a_loopback_receiver_are_warned_about() -> None:
    from controlplane.settings import Settings

    warn = Settings(replica_otlp_endpoint="10.0.0.5:4317").replica_spans_warning()
    assert warn is not None and "CONTROLPLANE_BIND_HOST" in warn and "127.0.0.1" in warn
    assert Settings(replica_otlp_endpoint="10.0.0.5:4317", bind_host="0.0.0.0").replica_spans_warning() is None
    assert Settings(replica_otlp_endpoint="10.0.0.5:4317", bind_host="10.0.0.5").replica_spans_warning() is None
    assert Settings(replica_otlp_endpoint="localhost:4317").replica_spans_warning() is None
    assert Settings().replica_spans_warning() is None
    # bound to one address, replicas sent to another: lost too; a name is the operator's to point
    assert Settings(replica_otlp_endpoint="127.0.0.1:4317", bind_host="10.0.0.5").replica_spans_warning() is not None
    assert Settings(replica_otlp_endpoint="10.0.0.6:4317", bind_host="10.0.0.5").replica_spans_warning() is not None
    assert Settings(replica_otlp_endpoint="plane.internal:4317", bind_host="10.0.0.5").replica_spans_warning() is None
    assert Settings(replica_otlp_endpoint="[::1]:4317", bind_host="::1").replica_spans_warning() is None


@pytest.mark.parametrize(("env", "shown"), [
    ({"CONTROLPLANE_SCRAPE_INTERVAL_S": "inf"}, "CONTROLPLANE_SCRAPE_INTERVAL_S: Input should be a finite number"),
    ({"CONTROLPLANE_COST_INTERVAL_S": "1e-300"}, "CONTROLPLANE_COST_INTERVAL_S: Input should be greater than or "
                                                 "equal to 1"),
    ({"CONTROLPLANE_API_TOKEN": "tökén"}, "CONTROLPLANE_API_TOKEN: Value error, the token must be printable ASCII "
                                          "without spaces"),
    ({"CONTROLPLANE_DATA_DIR": "~nosuchuser-cp/x"}, "CONTROLPLANE_DATA_DIR: Value error, cannot expand '~' in"),
    ({"CONTROLPLANE_DATABASE_URL": "mysql://bob:hunter2@db/x"}, "is not supported; use sqlite or postgresql (got "
                                                                "'mysql://bob:***@db/x')"),
])
def test_bad_settings_are_named_without_a_traceback_or_a_secret(env: dict[str, str], shown: str) -> None:
    result = runner.invoke(app, ["db", "upgrade"], env=env)
    out = " ".join(result.output.split())
    assert result.exit_code == 2 and shown in out and "Traceback" not in out, out
    assert "hunter2" not in out and "tökén" not in out


def test_tune_search_says_when_the_plane_lost_the_search_and_refuses_a_token_it_cannot_send() -> None:
    from fastapi import FastAPI, HTTPException

    from tests.unit.ui.plane import serve_app

    api = FastAPI()

    @api.post("/api/v1/deployments/{name}/search", status_code=202)
    def start(name: str) -> dict[str, object]:
        return {"id": 7, "status": "running", "progress": []}

    @api.get("/api/v1/searches/7")
    def gone() -> dict[str, object]:
        raise HTTPException(404, detail="no search 7 (searches are kept in memory by the plane that ran them)")

    with serve_app(api) as url:
        out = runner.invoke(app, ["tune", "search", "tiny", "--api", url, "--token", "t0k"])
    text = " ".join(out.output.split())
    assert out.exit_code == 1 and "search 7: 404: no search 7" in text and out.exception is not None
    assert isinstance(out.exception, SystemExit)
    bad = runner.invoke(app, ["tune", "search", "tiny", "--api", "http://127.0.0.1:9", "--token", "tökén"])
    assert bad.exit_code == 2 and "the token must be printable ASCII" in " ".join(bad.output.split())


def test_up_refuses_a_watch_port_that_is_no_port_and_an_slo_path_without_slos(tmp_path: Path) -> None:
    for watch, why in (("a=http://127.0.0.1:abc", "Port could not be cast to integer value as 'abc'"),
                       ("http://h:99999", "Port out of range 0-65535"), ("http://[::1", "Invalid IPv6 URL")):
        out = runner.invoke(app, ["up", "--watch", watch])
        text = " ".join(out.output.split())
        assert out.exit_code == 2 and f"--watch '{watch}': {why}" in text and "Traceback" not in text, text
    empty = tmp_path / "slos"
    empty.mkdir()
    out = runner.invoke(app, ["up", "--slo", str(empty)])
    assert out.exit_code == 2 and f"--slo {empty}: no SLO document found" in " ".join(out.output.split())


def test_up_refuses_an_slo_for_a_deployment_it_does_not_run(tmp_path: Path) -> None:
    (tmp_path / "tiny.yaml").write_text("apiVersion: controlplane/v1\nkind: Deployment\nmetadata: {name: tiny}\n"
                                        "spec: {model: {path: /m, served_name: tiny}}\n")
    (tmp_path / "slo.yaml").write_text("apiVersion: controlplane/v1\nkind: SLO\nmetadata: {name: typo}\n"
                                       "spec: {deployment: tiy, sli: ttft, threshold: 500ms, objective: 0.99, "
                                       "window: 30d}\n")
    for args in (["-c", str(tmp_path / "tiny.yaml")], ["--watch", "w=http://127.0.0.1:9"]):
        out = runner.invoke(app, ["up", *args, "--slo", str(tmp_path / "slo.yaml")])
        text = " ".join(out.output.split())
        assert out.exit_code == 2 and "SLO 'typo' is for deployment 'tiy', which is not a deployment" in text, text
        assert "backend: {kind: external" in text and "Traceback" not in text


def test_an_empty_api_token_means_unset_as_the_api_reads_it(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("CONTROLPLANE_API_TOKEN", "")
    assert Settings().api_token is None


def test_up_refuses_two_deployments_on_the_same_replica_ports(tmp_path: Path) -> None:
    for name in ("llama", "qwen"):
        (tmp_path / f"{name}.yaml").write_text(
            f"apiVersion: controlplane/v1\nkind: Deployment\nmetadata: {{name: {name}}}\n"
            f"spec: {{model: {{path: /m, served_name: {name}}}}}\n")
    out = runner.invoke(app, ["up", "-c", str(tmp_path / "llama.yaml"), "-c", str(tmp_path / "qwen.yaml")])
    assert out.exit_code == 2 and "llama (ports 8100-" in out.output and "overlap" in out.output
    assert "Traceback" not in out.output


def test_a_misspelt_setting_is_named_with_the_one_meant_and_no_values(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("CONTROLPLANE_TUNERMODE", "auto")
    monkeypatch.setenv("CONTROLPLANE_API_TOKEN", "s3cret")
    out = runner.invoke(app, ["db", "upgrade"])
    text = " ".join(out.output.split())
    assert out.exit_code == 2 and "CONTROLPLANE_TUNERMODE is not a setting (did you mean CONTROLPLANE_TUNER_MODE?)" \
        in text and "s3cret" not in text
    monkeypatch.delenv("CONTROLPLANE_TUNERMODE")
    monkeypatch.setenv("CONTROLPLANE_NOPE", "1")
    with pytest.raises(ValueError, match="CONTROLPLANE_NOPE is not a setting; the settings are .*_API_PORT"):
        Settings()


def test_an_empty_bind_host_is_loopback_not_every_interface(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("CONTROLPLANE_BIND_HOST", "")  # e.g. CONTROLPLANE_BIND_HOST=$HOST_IP with HOST_IP unset
    assert Settings().bind_host == "127.0.0.1"


def test_success_lines_never_print_the_database_password(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import controlplane.plane
    import controlplane.store.db

    monkeypatch.setenv("CONTROLPLANE_DATABASE_URL", "postgresql://bob:hunter2@127.0.0.1:5432/x")
    monkeypatch.setattr(controlplane.store.db, "upgrade", lambda engine: None)
    out = runner.invoke(app, ["db", "upgrade"])
    assert out.exit_code == 0 and "bob:***@127.0.0.1" in out.output and "hunter2" not in out.output

    def run_blocking(plane: controlplane.plane.Plane) -> None:
        plane.on_ready(controlplane.plane.Endpoints("http://a", "http://b", "c:1", None))  # type: ignore[misc]

    monkeypatch.setattr(controlplane.plane, "run_blocking", run_blocking)
    monkeypatch.setattr(controlplane.plane.Plane, "__init__", lambda self, settings, targets, *, on_ready, **kw:
                        setattr(self, "on_ready", on_ready))
    up = runner.invoke(app, ["up"])
    assert up.exit_code == 0 and "plane up store=postgresql://bob:***@" in up.output and "hunter2" not in up.output


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_up_refuses_repeated_names_and_its_own_ports_shared(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import controlplane.plane

    def never(plane: object) -> None:
        raise AssertionError("the plane started")

    monkeypatch.setattr(controlplane.plane, "run_blocking", never)
    dep = _write(tmp_path / "d.yaml", "apiVersion: controlplane/v1\nkind: Deployment\nmetadata: {name: tiny}\n"
                                      "spec: {model: {path: /m, served_name: tiny}}\n")
    slos = [_write(tmp_path / f"s{i}.yaml", "apiVersion: controlplane/v1\nkind: SLO\nmetadata: {name: tiny-ttft}\n"
                                            f"spec: {{deployment: tiny, sli: ttft, threshold: 500ms, "
                                            f"objective: 0.9{i}, window: 30d}}\n") for i in (1, 2)]
    out = runner.invoke(app, ["up", "-c", dep, "--slo", slos[0], "--slo", slos[1]])
    assert out.exit_code == 2 and "SLO names must be unique across --slo files; repeated: ['tiny-ttft']" in \
        " ".join(out.output.split())
    out = runner.invoke(app, ["up", "--watch", "a=http://127.0.0.1:9001", "--watch", "a=http://127.0.0.1:9002"])
    assert out.exit_code == 2 and "watched replica names must be unique across --watch entries; repeated: ['a']" in \
        " ".join(out.output.split())
    monkeypatch.setenv("CONTROLPLANE_API_PORT", "18080")
    monkeypatch.setenv("CONTROLPLANE_OTLP_HTTP_PORT", "18080")
    out = runner.invoke(app, ["up"])
    assert out.exit_code == 2 and "API (CONTROLPLANE_API_PORT) and OTLP/HTTP (CONTROLPLANE_OTLP_HTTP_PORT) are both " \
        "on port 18080" in " ".join(out.output.split())


def test_make_tiny_into_a_path_it_cannot_create_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    out = runner.invoke(app, ["model", "make-tiny", "--out", str(tmp_path / "file" / "tiny")])
    assert out.exit_code == 2 and f"--out {tmp_path / 'file' / 'tiny'}: Not a directory" in \
        " ".join(out.output.split()) and "Traceback" not in out.output


def test_what_if_on_a_store_that_does_not_exist_says_so_and_creates_nothing(tmp_path: Path) -> None:
    out = runner.invoke(app, ["tune", "what-if", "--trace-replica", "fleet"],
                        env={"CONTROLPLANE_DATA_DIR": str(tmp_path / "none")})
    assert out.exit_code == 2 and "no store at" in " ".join(out.output.split()) and not (tmp_path / "none").exists()


def test_the_ui_warns_when_it_listens_beyond_loopback_and_refuses_port_0(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr("os.execv", lambda _exe, argv: None)
    monkeypatch.setenv("CONTROLPLANE_API_TOKEN", "t0k")
    out = runner.invoke(app, ["ui", "--host", "0.0.0.0"])
    assert out.exit_code == 0 and "can apply and dismiss recommendations" in " ".join(out.output.split())
    assert "not loopback" not in runner.invoke(app, ["ui"]).output
    for port in (0, 99999):
        bad = runner.invoke(app, ["ui", "--api-url", f"http://127.0.0.1:{port}"])
        assert bad.exit_code == 2 and f"port {port} is not in 1..65535" in " ".join(bad.output.split())


def test_a_file_where_the_tiny_model_belongs_is_named_before_any_build(tmp_path: Path) -> None:
    from io import StringIO

    from rich.console import Console

    from controlplane.demo import run_demo

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").write_text("not a model")
    with pytest.raises(NotADirectoryError):
        make_tiny_model(tmp_path / "models" / "tiny")
    out = StringIO()
    assert run_demo(Settings(data_dir=tmp_path), Console(file=out, width=300)) == 2
    assert f"the tiny model at {tmp_path / 'models' / 'tiny'}" in out.getvalue() and "not a directory" in \
        out.getvalue()


def test_a_built_tiny_model_is_reused_without_a_lock_even_as_the_working_directory(tmp_path: Path,
                                                                                   monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from controlplane.engines.tiny_model import STAMP

    spec = TinyModelSpec(seed=5)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / STAMP).write_text(json.dumps({"recipe": spec.recipe_hash()}))
    monkeypatch.chdir(tmp_path / "tiny")
    assert make_tiny_model(Path("."), spec) == (Path("."), False)
    assert not list(tmp_path.glob("*.lock"))  # reuse takes no lock (a read-only place may allow none)


def test_kubernetes_service_links_are_not_taken_for_misspelt_settings(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for name, value in (("CONTROLPLANE_SERVICE_HOST", "10.0.0.1"), ("CONTROLPLANE_SERVICE_PORT", "8080"),
                        ("CONTROLPLANE_PORT", "tcp://10.0.0.1:8080"), ("CONTROLPLANE_PORT_8080_TCP_ADDR", "10.0.0.1")):
        monkeypatch.setenv(name, value)
    assert Settings().api_port == 8080
