"""Settings of the plane: one default in one place, overridable by `CONTROLPLANE_*` environment variables."""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX: Final = "CONTROLPLANE_"
# Variables with the prefix that are read elsewhere, not settings: the app's API URL, the tests' PostgreSQL.
OTHER_ENV: Final = frozenset({"CONTROLPLANE_API_URL", "CONTROLPLANE_TEST_PG_URL"})
# What Kubernetes puts in every pod for a Service named `controlplane` (CONTROLPLANE_SERVICE_HOST,
# CONTROLPLANE_PORT_8080_TCP_ADDR, ...): not ours to refuse.
_SERVICE_LINKS: Final = re.compile(r"CONTROLPLANE_(SERVICE_(HOST|PORT)(_\w+)?|PORT(_\d+_(TCP|UDP|SCTP)(_\w+)?)?)")


def is_sendable_token(token: str) -> bool:
    """Whether a bearer token can go in an HTTP header and match there: printable ASCII without spaces (headers
    carry bytes, read as latin-1 by the server and written as ASCII by httpx)."""
    return re.fullmatch(r"[\x21-\x7e]+", token) is not None


class Settings(BaseSettings):
    # inf and nan are no interval, port or price: `gt=0` alone lets "inf" through (a scrape loop that never
    # scrapes again, a cost gauge of 0 per hour).
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", allow_inf_nan=False)

    data_dir: Path = Field(default=Path("data"), description="Where the SQLite store, models and reports live.")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default: a SQLite file (WAL) in data_dir."
    )
    # Loopback by default: nothing is exposed beyond this host unless asked for.
    bind_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=0, le=65535)
    router_port: int = Field(default=8000, ge=0, le=65535, description="OpenAI-compatible router (supervised fleets)")
    router_read_timeout_s: float = Field(
        default=600.0, gt=0, le=86_400,
        description="The longest a replica may stay silent behind the router, before its answer starts (a "
                    "non-streamed answer starts only when whole) or between two chunks; past it the client gets "
                    "a 504, or its stream is cut.")
    otlp_http_port: int = Field(default=4318, ge=0, le=65535)
    otlp_grpc_port: int = Field(default=4317, ge=0, le=65535)
    ui_port: int = Field(default=8501, ge=1, le=65535, description="The Streamlit app (`controlplane ui`, the demo)")
    replica_otlp_endpoint: str | None = Field(
        default=None,
        description="host:port where the replicas the plane starts send their spans (OTLP/gRPC); default: this "
                    "host's receiver (bind_host, a wildcard reached on loopback). Set it when replicas run on "
                    "other hosts (a Ray cluster), with bind_host reachable from them.")
    api_token: str | None = Field(default=None, description="Bearer token required by mutating endpoints.")
    scrape_interval_s: float = Field(default=5.0, ge=0.1, le=3600)
    scrape_timeout_s: float = Field(default=3.0, ge=0.1, le=600)
    gpu_interval_s: float = Field(default=10.0, ge=0.1, le=3600)
    dcgm_url: str | None = Field(default=None, description="dcgm-exporter /metrics URL; NVML is used without it.")
    otlp_max_body_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    slo_interval_s: float = Field(default=30.0, ge=0.1, le=3600,
                                  description="How often SLOs are evaluated and alerts decided.")
    alertmanager_url: str | None = Field(
        default=None, description="Alertmanager base URL (e.g. http://127.0.0.1:9093); alerts go to its v2 API.")
    watched_price_per_replica_hour_usd: float | None = Field(
        default=None, gt=0, description="Price of one watched (not supervised) replica per hour, for cost per token; "
                                        "unknown (no cost shown) when unset.")
    cost_interval_s: float = Field(default=60.0, ge=1, le=86_400,
                                   description="The /metrics cost gauges cover the last 5 x this, s.")
    tuner_mode: str = Field(default="recommend", pattern=r"^(off|recommend|auto)$",
                            description="off | recommend (a person applies) | auto (the plane applies, audited).")
    tuner_interval_s: float = Field(default=15.0, ge=0.1, le=3600, description="How often the autoscaler decides.")
    tuner_startup_s: float = Field(default=90.0, ge=0, description="Replica start-up time the autoscaler plans "
                                                                   "ahead for (its forecast lead time).")
    tuner_min_finished: int = Field(default=50, ge=1, description="Finished requests an interval needs before its "
                                                                  "SLO attainment counts as evidence.")

    @field_validator("database_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(v)
        except ArgumentError:
            raise ValueError(
                "not a database URL; expected e.g. sqlite:///path/to/file.db or "
                "postgresql://user@host:5432/dbname"
            ) from None
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError(f"database {url.get_backend_name()!r} is not supported; use sqlite or postgresql")
        return v

    @field_validator("bind_host")
    @classmethod
    def _bind_host(cls, v: str) -> str:
        # Set but empty is unset, as for the token: `CONTROLPLANE_BIND_HOST=$HOST_IP` with HOST_IP unset must not
        # open the plane to the network ('' is every interface to Python's sockets). Every interface is spelled
        # 0.0.0.0 or ::. Brackets are for URLs, not binds.
        v = v.strip().removeprefix("[").removesuffix("]")
        return v or "127.0.0.1"

    @model_validator(mode="after")
    def _no_unknown_variables(self) -> Settings:
        # pydantic-settings ignores environment variables that match no field (extra="forbid" covers only
        # arguments), so a misspelt one would leave its default in force without a word.
        if unknown := unknown_env(os.environ):
            raise ValueError("; ".join(unknown))
        return self

    @field_validator("replica_otlp_endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None:
            split_host_port(v)
        return v

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        try:
            return v.expanduser()
        except RuntimeError as exc:  # ~user that does not exist, or ~ with no HOME: pydantic would not wrap it
            raise ValueError(f"cannot expand '~' in {str(v)!r}: {exc}") from None

    @field_validator("api_token")
    @classmethod
    def _token(cls, v: str | None) -> str | None:
        # Any other token could never be sent or matched, so every mutating call would fail with a 401.
        if not v:
            return None  # set but empty: unset, as the API and the app have always read it (endpoints off)
        if not is_sendable_token(v):
            raise ValueError("the token must be printable ASCII without spaces (e.g. `openssl rand -hex 32`), at "
                             "least one character")
        return v

    def local_address(self, port: int) -> str:
        """host:port by which a process on this host reaches a server of the plane listening on `bind_host`:`port`.
        A wildcard address is reached on loopback, and an IPv6 literal gets its brackets."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.bind_host, self.bind_host)  # '' became 0.0.0.0
        return host_port(host, port)

    def replica_spans_endpoint(self, grpc_port: int) -> str:
        """Where the replicas the plane starts send their spans: `replica_otlp_endpoint`, else this host's
        receiver."""
        return self.replica_otlp_endpoint or self.local_address(grpc_port)

    def replica_spans_warning(self) -> str | None:
        """Replicas told to send their spans to an address the receiver does not listen on: an address off this
        host while it listens on loopback only, or another IP address than the one it is bound to. Every span they
        send would be lost. Names other than localhost are the operator's to point."""
        if self.replica_otlp_endpoint is None or self.bind_host in WILDCARDS:
            return None
        host, _ = split_host_port(self.replica_otlp_endpoint)
        endpoint_ip, bind_ip = _ip(host), _ip(self.bind_host)
        if endpoint_ip is not None and bind_ip is not None:
            lost = endpoint_ip != bind_ip
        elif is_loopback_host(self.bind_host, wildcard=False):
            lost = not is_loopback_host(host)
        else:
            lost = False
        if not lost:
            return None
        return (f"CONTROLPLANE_REPLICA_OTLP_ENDPOINT is {self.replica_otlp_endpoint}, but the plane's receiver listens "
                f"on {self.bind_host} only: replicas sending there reach no receiver and their spans are lost. Set "
                f"CONTROLPLANE_BIND_HOST to the address they are sent to, or the endpoint to one the receiver listens "
                f"on (a bind beyond loopback also opens the API's reads and the router to the network: set "
                f"CONTROLPLANE_API_TOKEN for the mutating endpoints)")

    def local_url(self, port: int) -> str:
        """The http:// URL of `local_address`."""
        return f"http://{self.local_address(port)}"

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'controlplane.db').resolve()}"


LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost", "ip6-loopback"})
WILDCARDS = frozenset({"0.0.0.0", "::"})


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


# An optional plaintext scheme (vLLM's docs write grpc://; the exporter strips it and stays without TLS), then a
# bracketed IPv6 literal or a name / IPv4 address, then the port. ASCII only: gRPC reads no other digits.
_HOST_PORT = re.compile(r"(?:grpc://|http://)?(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]:(?P<p6>[0-9]{1,5})"
                        r"|(?P<host>[A-Za-z0-9._-]+):(?P<port>[0-9]{1,5}))")


def host_port(host: str, port: int) -> str:
    """host:port, with an IPv6 literal in brackets (what gRPC and URLs expect)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_host_port(endpoint: str) -> tuple[str, int]:
    """(host, port) of a gRPC `host:port` target such as 10.0.0.5:4317, plane.internal:4317 or [fd00::5]:4317;
    ValueError saying what is allowed otherwise."""
    m = _HOST_PORT.fullmatch(endpoint)
    allowed = ("expected host:port as the replicas reach the plane's OTLP/gRPC receiver, e.g. 10.0.0.5:4317, "
               "plane.internal:4317 or [fd00::5]:4317 (an IPv6 address in brackets, without a zone), optionally "
               "after grpc:// or http://; not https:// (the plane's receiver has no TLS)")
    if m is None:
        raise ValueError(f"{endpoint!r}: {allowed}")
    host, port = (m["v6"], int(m["p6"])) if m["v6"] else (m["host"], int(m["port"]))
    if m["v6"]:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{endpoint!r}: {host!r} is not an IPv6 address; {allowed}") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"{endpoint!r}: port {port} is not in 1..65535")
    return host, port


def is_loopback_host(host: str, *, wildcard: bool = True) -> bool:
    """A host that is this machine from wherever it is used: a loopback address or name, or (`wildcard`) 0.0.0.0
    or ::, which reach oneself when connected to. With wildcard=False, for an address listened on: loopback only
    (a wildcard listens everywhere)."""
    if host.strip("[]").lower().rstrip(".") in LOOPBACK_NAMES:
        return True
    address = _ip(host)
    if address is None:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return address.is_loopback or (mapped is not None and mapped.is_loopback) or (wildcard and address.is_unspecified)


def unknown_env(environ: Mapping[str, str]) -> list[str]:
    """A message for each CONTROLPLANE_* variable that is no setting (nor one of OTHER_ENV), with the closest
    setting's name when one is close."""
    known = sorted({ENV_PREFIX + name.upper() for name in Settings.model_fields} | OTHER_ENV)
    suffixes = [k.removeprefix(ENV_PREFIX) for k in known]
    out = []
    for name in sorted(environ):
        upper = name.upper()
        if upper.startswith(ENV_PREFIX) and upper not in known and not _SERVICE_LINKS.fullmatch(upper):
            close = difflib.get_close_matches(upper.removeprefix(ENV_PREFIX), suffixes, n=1, cutoff=0.6)
            out.append(f"{name} is not a setting" + (f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else
                                                     f"; the settings are {', '.join(known)}"))
    return out


def describe_errors(exc: ValidationError) -> list[str]:
    """One line per bad setting, naming its environment variable and repeating the value without its secrets;
    an error about the settings as a whole (an unknown variable) repeats no value."""
    out = []
    for err in exc.errors():
        name = str(err["loc"][0]) if err["loc"] else ""
        if not name:
            out.append(f"settings: {err['msg'].removeprefix('Value error, ')}")
        else:
            out.append(f"{ENV_PREFIX}{name.upper()}: {err['msg']} (got {_shown(name, err.get('input'))})")
    return out


def _shown(name: str, value: object) -> str:
    """A bad setting as the error repeats it, without the secrets it may hold."""
    if name == "api_token":
        return "a token (not shown)"
    if name == "database_url" and isinstance(value, str):
        from sqlalchemy.engine import make_url

        try:
            return repr(make_url(value).render_as_string(hide_password=True))
        except Exception:  # noqa: BLE001 - not even a URL: it has no password part to hide
            return repr(re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", value))
    return repr(value)
