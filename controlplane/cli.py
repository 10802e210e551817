"""`controlplane` command line. It only wires: every command calls into the packages."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from controlplane.grafana.render import app as dashboards_app
from controlplane.settings import Settings, describe_errors, is_loopback_host
from controlplane.slo.render import app as slo_app
from controlplane.tuning.whatif import app as tune_app
from controlplane.ui.client import ENV_API_URL

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="SLO control plane for vLLM fleets.")
model_app = typer.Typer(no_args_is_help=True, help="Models the plane can serve.")
db_app = typer.Typer(no_args_is_help=True, help="The SQL store.")
app.add_typer(model_app, name="model")
app.add_typer(db_app, name="db")
app.add_typer(tune_app, name="tune")
app.add_typer(slo_app, name="slo")
app.add_typer(dashboards_app, name="dashboards")
console = Console(stderr=True)


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        for line in describe_errors(exc):
            console.print(f"[red]error:[/] {line}", highlight=False)
        raise typer.Exit(2) from None


def _hidden(url: str) -> str:
    """A database URL as printed: without its password."""
    return make_url(url).render_as_string(hide_password=True)


def _store_error(url: str, exc: BaseException) -> NoReturn:
    shown = _hidden(url)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    console.print(f"[red]error:[/] cannot open the store at {shown} (CONTROLPLANE_DATABASE_URL / "
                  f"CONTROLPLANE_DATA_DIR): {first}")
    raise typer.Exit(1)


_PORT_VARS = {"router": "ROUTER_PORT", "API": "API_PORT", "OTLP/HTTP": "OTLP_HTTP_PORT", "OTLP/gRPC": "OTLP_GRPC_PORT"}


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:
        # One line per probe and scrape would drown the supervisor's own messages.
        logging.getLogger("httpx").setLevel(logging.WARNING)


@model_app.command("make-tiny")
def make_tiny(
    out: Annotated[Path, typer.Option(help="Directory to write the model into.")],
    seed: Annotated[int, typer.Option(help="Seed for the tokenizer corpus and the weights.")] = 0,
) -> None:
    """Build a tiny Llama model (random weights, locally trained tokenizer). Reuses a finished build."""
    from controlplane.engines.tiny_model import TinyModelSpec, make_tiny_model

    if out.exists() and not out.is_dir():  # found before the build, not when its result is moved into place
        console.print(f"[red]error:[/] --out {out}: exists and is not a directory")
        raise typer.Exit(2)
    try:
        with console.status("building tiny model") as status:
            path, built = make_tiny_model(out, TinyModelSpec(seed=seed), progress=lambda m: status.update(m))
    except OSError as exc:  # a parent that cannot be made or written: the path and why, not a traceback
        console.print(f"[red]error:[/] --out {out}: {exc.strerror or exc}")
        raise typer.Exit(2) from None
    console.print(f"[green]{'built' if built else 'reused'}[/] tiny model at {path}")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the store's schema to the newest version."""
    from controlplane.store.db import make_engine, upgrade

    settings = _settings()
    url = settings.resolved_database_url()
    try:
        upgrade(make_engine(url))
    except (SQLAlchemyError, OSError) as exc:
        _store_error(url, exc)
    console.print(f"[green]store at head[/]: {_hidden(url)}")


@app.command()
def up(
    config: Annotated[list[Path] | None, typer.Option(
        "--config", "-c", help="Deployment spec (YAML) to run and supervise (repeatable).")] = None,
    watch: Annotated[list[str] | None, typer.Option(
        help="vLLM server to watch: URL or NAME=URL (repeatable).")] = None,
    slo: Annotated[list[Path] | None, typer.Option(
        "--slo", help="SLO spec (kind: SLO or OpenSLO v1 YAML) to evaluate and alert on (repeatable).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the plane: supervised replicas and their router, OTLP receivers, scraping, GPU telemetry, SLOs and
    alerts, REST API."""
    from collectors.scrape_loop import Target
    from controlplane.plane import Endpoints, Plane, run_blocking
    from controlplane.slo.spec import SpecError as SloSpecError
    from controlplane.slo.spec import load_slos
    from controlplane.supervisor.backends import AdoptUnknown
    from controlplane.supervisor.spec import SpecError, load_deployment, port_conflicts

    _logging(verbose)
    settings = _settings()
    try:
        targets = [Target.from_watch(w) for w in watch or []]
        deployments = [load_deployment(p) for p in config or []]
        slos = []
        for p in slo or []:
            found = load_slos(p)
            if not found:  # a typo'd directory or an empty file would leave the plane judging nothing, silently
                raise ValueError(f"--slo {p}: no SLO document found (a directory is read for *.yaml and *.yml)")
            slos += found
    except (ValueError, SpecError, SloSpecError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    names = [d.name for d in deployments]
    for what, given, flag in (("deployment", names, "--config files"), ("SLO", [o.name for o in slos], "--slo files"),
                              ("watched replica", [t.name for t in targets], "--watch entries")):
        # Keyed by name downstream (the supervisor, the SLO monitor's state, the scraper's targets): a second one
        # of a name would silently replace or merge with the first.
        if repeated := sorted({n for n in given if given.count(n) > 1}):
            console.print(f"[red]error:[/] {what} names must be unique across {flag}; repeated: {repeated}")
            raise typer.Exit(2)
    # An SLO judges a deployment's replicas: one naming no deployment of this plane (a typo; replicas watched
    # with --watch belong to none) would read "no data" every round and never page, with nothing to say why.
    orphans = [f"SLO {o.name!r} is for deployment {o.deployment!r}" for o in slos if o.deployment not in names]
    if orphans:
        console.print(f"[red]error:[/] {'; '.join(orphans)}, which is not a deployment of this plane (--config: "
                      f"{', '.join(names) or 'none'}). Replicas watched with --watch belong to no deployment: to "
                      "judge one, give it a deployment spec with backend: {kind: external, urls: [...]}.")
        raise typer.Exit(2)
    own = {"router": settings.router_port, "API": settings.api_port, "OTLP/HTTP": settings.otlp_http_port,
           "OTLP/gRPC": settings.otlp_grpc_port}
    clashes = port_conflicts(deployments, own)
    for port in sorted({p for p in own.values() if p}):  # 0: any free port, never a clash
        if len(users := [f"{k} (CONTROLPLANE_{_PORT_VARS[k]})" for k, p in own.items() if p == port]) > 1:
            clashes.append(f"the plane's {' and '.join(users)} are both on port {port}")
    if clashes:
        console.print("[red]error:[/] " + "\n  ".join(clashes))
        raise typer.Exit(2)

    def ready(e: Endpoints) -> None:
        console.print(f"[green]plane up[/] store={_hidden(settings.resolved_database_url())}")
        console.print(f"  REST API     {e.api}  (health {e.api}/healthz)")
        console.print(f"  OTLP/HTTP    {e.otlp_http}")
        console.print(f"  OTLP/gRPC    {e.otlp_grpc}")
        if not is_loopback_host(settings.bind_host, wildcard=False):
            console.print(f"  [yellow]listening on {settings.bind_host}, not loopback only[/]: reads, the router and "
                          "/metrics are open to the network; "
                          + ("mutating endpoints need the API token" if settings.api_token else
                             "no API token is set, so mutating endpoints are off"))
        if e.router:
            console.print(f"  router       {e.router}/v1  (OpenAI-compatible)")
        for d in deployments:
            console.print(f"  deployment   {d.name}: {d.served_name} on the {d.backend.kind} backend "
                          f"(state: {e.api}/api/v1/deployments)")
        for t in targets:
            console.print(f"  watching     {t.name} at {t.base_url}")
        for o in slos:
            sink = settings.alertmanager_url or "the store only"
            console.print(f"  SLO          {o.name}: {o.sli} of {o.deployment}, objective {o.objective:.4g} "
                          f"(every {settings.slo_interval_s:g} s; alerts to {sink})")

    try:
        run_blocking(Plane(settings, targets, on_ready=ready, deployments=deployments, slos=slos))
    except SQLAlchemyError as exc:
        _store_error(settings.resolved_database_url(), exc)
    except (OSError, AdoptUnknown) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    console.print("plane stopped")


@app.command()
def demo(
    engine: Annotated[str, typer.Option(help="vllm: real vLLM on this CPU (tiny model); sim: a simulated GPU fleet.")
                      ] = "vllm",
    keep_running: Annotated[bool, typer.Option(help="Leave the plane and the Streamlit app up afterwards.")] = False,
) -> None:
    """The closed loop: steady load, a burst that breaks the TTFT SLO, the page, the tuner's scale-up, the
    recovery; then a Markdown report with plots."""
    from controlplane.demo import run_demo

    if engine not in ("vllm", "sim"):
        console.print(f"[red]error:[/] --engine {engine!r}: allowed: vllm, sim")
        raise typer.Exit(2)
    logging.basicConfig(level=logging.WARNING)
    raise typer.Exit(run_demo(_settings(), console, engine=engine, keep_running=keep_running))


@app.command()
def ui(
    api_url: Annotated[str | None, typer.Option(help="The plane's REST API (default: CONTROLPLANE_API_URL, else "
                                                     "from CONTROLPLANE_BIND_HOST and CONTROLPLANE_API_PORT).")]
    = None,
    host: Annotated[str, typer.Option(help="Address the app listens on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="Port of the app (default: CONTROLPLANE_UI_PORT, else 8501).",
                                             min=1, max=65535)] = None,
) -> None:
    """Run the Streamlit app. It reads only the REST API; CONTROLPLANE_API_TOKEN enables Apply / Dismiss."""
    from controlplane.ui.launch import streamlit_argv

    if api_url is None or port is None:
        s = _settings()
        port = s.ui_port if port is None else port
        # the URL the app itself reads, else the plane this machine's settings describe
        if api_url is None:  # an empty --api-url is a bad URL, refused below, not "not given"
            api_url = os.environ.get(ENV_API_URL) or s.local_url(s.api_port)
    try:
        argv = streamlit_argv(api_url, host, port)
    except ValueError as exc:
        console.print(f"[red]error:[/] --api-url {api_url!r}: {exc}")
        raise typer.Exit(2) from None
    if not is_loopback_host(host, wildcard=False):
        token = os.environ.get("CONTROLPLANE_API_TOKEN")
        console.print(f"[yellow]the app listens on {host}, not loopback only[/]: anyone who reaches it reads the "
                      "plane" + (", and can apply and dismiss recommendations with this app's API token"
                                 if token else ""))
    os.execv(argv[0], argv)


def spelled_as_subcommands(argv: list[str]) -> list[str]:
    """`controlplane tune --what-if ...` (the flag form, anywhere among tune's options) is `controlplane tune
    what-if ...`: Click reads a flag on a group as the group's own option, so the entry point rewrites it before
    Typer parses."""
    if len(argv) >= 2 and argv[0] == "tune" and "--what-if" in argv[1:]:
        rest = list(argv[1:])
        rest.remove("--what-if")
        return ["tune", "what-if", *rest]
    return argv


def main() -> None:
    """The `controlplane` console script."""
    import sys

    app(args=spelled_as_subcommands(sys.argv[1:]), prog_name="controlplane")


if __name__ == "__main__":
    main()
