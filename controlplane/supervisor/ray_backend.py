"""The Ray backend: each replica is a detached, named Ray actor that owns one vLLM server process.

Why actors and not Ray Serve: the plane must be the only owner of the replica count and of each
replica's configuration. Serve brings its own autoscaler, its own rolling-update semantics and its
own proxy, which would fight the supervisor (two owners of the count, a lesson peers paid for);
and Serve's LLM integration runs vLLM in-process, so a crash takes the replica actor with it and
restarts happen on Serve's terms. An actor per replica gives Ray what it is good at (placement by
resources across nodes, `num_gpus` accounting, a named handle that outlives the plane) while
start, probe, drain, restart and rollback stay identical to the local backend, and the same router,
scraper and trace path serve both.

Actors are detached and named `<replica>` in the deployment's namespace, so a restarted plane finds
them again with `ray.get_actor`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, cast

import ray

from controlplane.engines.vllm_server import VllmServer, VllmServerSpec
from controlplane.settings import is_loopback_host, split_host_port
from controlplane.supervisor.backends import LOST, AdoptUnknown, Handle, LaunchRequest
from controlplane.supervisor.spec import RayBackend as RaySpec

log = logging.getLogger(__name__)


class VllmReplicaActor:
    """Runs inside a Ray worker on the node Ray chose; owns the vLLM process group there."""

    def __init__(self) -> None:
        self.server: VllmServer | None = None

    def start(self, spec: VllmServerSpec, log_path: str) -> dict[str, Any]:
        node_ip = str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
        spec = dataclasses.replace(spec, host=node_ip)
        self.server = VllmServer(spec, Path(log_path))
        self.server.start()
        assert self.server.proc is not None
        return {"pid": self.server.proc.pid, "node_ip": node_ip, "url": spec.base_url, "port": spec.port,
                "log": log_path}

    def exit_code(self) -> int | None:
        if self.server is None or self.server.proc is None:
            return LOST
        return self.server.proc.poll()

    def stop(self, timeout_s: float) -> None:
        if self.server is not None:
            self.server.stop(timeout_s)

    def info(self) -> dict[str, Any]:
        proc = self.server.proc if self.server else None
        return {"pid": proc.pid if proc else None, "url": self.server.spec.base_url if self.server else None,
                "port": self.server.spec.port if self.server else None,
                "otlp_endpoint": self.server.spec.otlp_endpoint if self.server else None}


class RayActorBackend:
    kind = "ray"

    def __init__(self, spec: RaySpec, call_timeout_s: float = 30.0) -> None:
        self.spec = spec
        self.call_timeout_s = call_timeout_s
        self._actor_cls: Any = None

    def _connect(self) -> Any:
        if self._actor_cls is None:
            if not ray.is_initialized():
                ray.init(address=self.spec.address, namespace=self.spec.namespace, logging_level=logging.WARNING,
                         log_to_driver=False)
            self._actor_cls = ray.remote(max_restarts=0)(VllmReplicaActor)
        return self._actor_cls

    def launch(self, req: LaunchRequest) -> Handle:
        cls = self._connect()
        actor = cls.options(name=req.replica, namespace=self.spec.namespace, lifetime="detached",
                            num_cpus=self.spec.num_cpus_per_replica, num_gpus=self.spec.num_gpus_per_replica,
                            get_if_exists=False).remote()
        cores = req.cores(self.spec.cpu_cores)
        # The actor replaces the host with its node's IP.
        spec = req.server_spec(host="0.0.0.0", cpu_cores=cores)
        try:
            info = ray.get(actor.start.remote(spec, str(req.log_dir / f"{req.replica}.log")),
                           timeout=self.call_timeout_s)
        except BaseException:
            # The actor is detached: left alive it would keep its CPUs / GPUs and its name for good. A start that
            # timed out may still have started vLLM: stopped first, or killing the actor would orphan it.
            # A still-pending actor (no GPU free) answers no stop either: wait for it briefly.
            self._stop_and_kill(actor, req.replica, 5.0, wait_s=15.0)
            raise
        self._warn_lost_spans(req.replica, spec.otlp_endpoint, info.get("node_ip"))
        runtime = {"actor": req.replica, "namespace": self.spec.namespace, **info}
        return Handle(req.replica, str(info["url"]), runtime, private=actor)

    def exit_code(self, handle: Handle) -> int | None:
        try:
            code = ray.get(handle.private.exit_code.remote(), timeout=self.call_timeout_s)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError):
            # A slow cluster, or an actor Ray says is unreachable for now (a RayActorError that may come back), is
            # not a dead replica: unknown, and the liveness probe still judges it.
            return None
        except ray.exceptions.RayError:  # the actor (or its node) is gone
            return LOST
        return None if code is None else int(code)

    def stop(self, handle: Handle, timeout_s: float) -> None:
        if handle.private is not None:
            self._stop_and_kill(handle.private, handle.replica, timeout_s, handle.runtime)

    def _stop_and_kill(self, actor: Any, replica: str, timeout_s: float,
                       runtime: dict[str, Any] | None = None, *, wait_s: float | None = None) -> None:
        """Have the actor stop its vLLM process, then kill the actor. Killing it alone would leave vLLM running:
        the server runs in its own session, so the end of the worker does not reach it."""
        try:
            ray.get(actor.stop.remote(timeout_s), timeout=timeout_s + self.call_timeout_s if wait_s is None else wait_s)
        except ray.exceptions.RayError as exc:
            where = f" (pid {runtime.get('pid')} on {runtime.get('node_ip')})" if runtime else ""
            log.warning("ray replica %s: stop failed (%s); killing the actor. If its vLLM process%s still runs, it "
                        "holds its GPU and port until it is stopped by hand", replica, exc, where)
        self._kill(actor)

    @staticmethod
    def _warn_lost_spans(replica: str, endpoint: str | None, node_ip: object) -> None:
        try:
            plane_ip: str | None = str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
        except Exception:  # noqa: BLE001 - only feeds a warning
            plane_ip = None
        if warning := lost_spans_warning(replica, endpoint, str(node_ip or ""), plane_ip):
            log.warning("%s", warning)

    @staticmethod
    def _kill(actor: Any) -> None:
        try:
            ray.kill(actor, no_restart=True)
        except (ValueError, ray.exceptions.RayError):
            pass

    def adopt(self, replica: str, url: str, runtime: dict[str, Any]) -> Handle | None:
        try:
            self._connect()
            actor = ray.get_actor(str(runtime.get("actor", replica)), namespace=self.spec.namespace)
            info = cast(dict[str, Any], ray.get(actor.info.remote(), timeout=self.call_timeout_s))
            code = ray.get(actor.exit_code.remote(), timeout=self.call_timeout_s)
        except ValueError:  # no such actor
            return None
        except ray.exceptions.ActorUnavailableError as exc:  # a RayActorError, but only unreachable for now
            raise AdoptUnknown(f"ray replica {replica}: its actor is unreachable for now ({exc})") from None
        except ray.exceptions.RayActorError:  # the actor died
            return None
        except ray.exceptions.RayError as exc:  # a timeout, the GCS away: it may still run
            raise AdoptUnknown(f"ray replica {replica}: the cluster did not say whether its actor still runs "
                               f"({type(exc).__name__}: {exc})") from None
        if code is not None or info.get("url") != url:
            # Ours, but not the replica the store knows: it would hold its resources for good.
            self._stop_and_kill(actor, replica, 10.0, {**runtime, **info})  # the node is in the stored runtime
            return None
        # it keeps the spans endpoint it was started with (an actor from an older plane does not say which)
        self._warn_lost_spans(replica, info.get("otlp_endpoint"), runtime.get("node_ip"))
        return Handle(replica, url, dict(runtime), private=actor)

    def close(self) -> None:
        if ray.is_initialized():
            ray.shutdown()


def lost_spans_warning(replica: str, endpoint: str | None, replica_ip: str, plane_ip: str | None) -> str | None:
    """A warning when a replica on another node than the plane's would send its spans to a loopback (or wildcard)
    address: that is its own node, where no receiver listens, so every span would be lost (and its SLOs judged on
    nothing)."""
    if not endpoint or not replica_ip or plane_ip is None or replica_ip == plane_ip:
        return None
    try:
        host, _ = split_host_port(endpoint)
    except ValueError:
        return None  # not a target this check can read; the settings validate the plane's own
    if not is_loopback_host(host):  # another name or address: where it points is the operator's choice
        return None
    return (f"ray replica {replica} runs on node {replica_ip}, not on the plane's node ({plane_ip}), but sends its "
            f"spans to {endpoint}, its own loopback: they will be lost. Set CONTROLPLANE_REPLICA_OTLP_ENDPOINT to "
            f"an address of the plane that node reaches, and CONTROLPLANE_BIND_HOST so the receiver listens there")
