"""A small client of the plane's REST API for the Streamlit app (the app reads nothing else).

Every failure becomes one of three exceptions whose message a page can show as is: the plane is
unreachable (which URL, why), the plane does not have the endpoint (an older plane), or it answered
with an error (status and the API's own `detail`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import httpx

from controlplane.settings import is_sendable_token

DEFAULT_API_URL = "http://127.0.0.1:8080"
ENV_API_URL = "CONTROLPLANE_API_URL"
ENV_API_TOKEN = "CONTROLPLANE_API_TOKEN"
Params = Mapping[str, str | int | float | None]


class PlaneError(Exception):
    """The plane answered, with an error: `status` and the API's `detail`."""

    def __init__(self, method: str, url: str, status: int, detail: str) -> None:
        super().__init__(f"{method} {url} answered {status}: {detail}")
        self.url, self.status, self.detail = url, status, detail


class NotAvailable(PlaneError):
    """The plane has no such endpoint (FastAPI's bare 404): it is older than this app."""


class PlaneUnreachable(Exception):
    """No answer at all: the plane is down, the URL is wrong, or it timed out."""

    def __init__(self, base_url: str, reason: str) -> None:
        super().__init__(f"cannot reach the control plane at {base_url} ({reason}); is it running? "
                         f"Set {ENV_API_URL} to its REST API URL.")
        self.base_url, self.reason = base_url, reason


def _detail(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text[:300] or r.reason_phrase
    detail = body.get("detail") if isinstance(body, dict) else None
    return str(detail) if detail is not None else str(body)[:300]


class PlaneClient:
    """Typed calls for the endpoints the app uses; `transport` is injectable for tests."""

    def __init__(self, base_url: str = DEFAULT_API_URL, token: str | None = None, *, timeout_s: float = 10.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        # A token no HTTP header can carry (the plane refuses such a token too): read only, said so, never a
        # traceback at the first Apply.
        self.token_refused = bool(token) and not is_sendable_token(token or "")
        self.token = None if self.token_refused else token or None
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s, transport=transport)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PlaneClient:
        env = os.environ if env is None else env
        return cls(env.get(ENV_API_URL) or DEFAULT_API_URL, env.get(ENV_API_TOKEN))

    def close(self) -> None:
        self._http.close()

    # --- plumbing -------------------------------------------------------------------------------
    def _call(self, method: str, path: str, params: Params | None = None, *, auth: bool = False,
              body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        clean = {k: v for k, v in (params or {}).items() if v is not None}
        headers = {"Authorization": f"Bearer {self.token}"} if auth and self.token else {}
        try:
            r = self._http.request(method, path, params=clean, headers=headers,
                                   json=dict(body) if body is not None else None)
        except httpx.TimeoutException:
            raise PlaneUnreachable(self.base_url, "timed out") from None
        except httpx.TransportError as exc:
            raise PlaneUnreachable(self.base_url, str(exc) or type(exc).__name__) from None
        if r.status_code >= 400:
            detail = _detail(r)
            kind = NotAvailable if r.status_code in (404, 405) and detail in ("Not Found", "Method Not Allowed") \
                else PlaneError
            raise kind(method, str(r.url), r.status_code, detail)
        try:
            body = r.json()
        except ValueError:
            raise PlaneError(method, str(r.url), r.status_code, "the answer is not JSON") from None
        if not isinstance(body, dict):
            raise PlaneError(method, str(r.url), r.status_code, "the answer is not a JSON object")
        return body

    def get(self, path: str, params: Params | None = None) -> dict[str, Any]:
        return self._call("GET", path, params)

    def _items(self, path: str, params: Params | None = None) -> list[dict[str, Any]]:
        """The `items` list of a collection answer; anything else is the plane's error, not ours to crash on."""
        items = self.get(path, params).get("items")
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise PlaneError("GET", self.base_url + path, 200, "the answer has no list of objects under 'items'")
        return items

    def post(self, path: str, body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A mutating call, with the bearer token when one is configured."""
        return self._call("POST", path, auth=True, body=body)

    # --- reads ----------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self.get("/healthz")

    def deployments(self) -> list[dict[str, Any]]:
        return self._items("/api/v1/deployments")

    def replicas(self) -> list[dict[str, Any]]:
        return self._items("/api/v1/replicas")

    def requests(self, *, since: float | None = None, until: float | None = None, replica: str | None = None,
                 limit: int = 1000, before_id: int | None = None) -> dict[str, Any]:
        return self.get("/api/v1/requests", {"since": since, "until": until, "replica": replica, "limit": limit,
                                             "before_id": before_id})

    def engine_samples(self, *, since: float | None = None, until: float | None = None,
                       replica: str | None = None, limit: int = 5000) -> list[dict[str, Any]]:
        return self._items("/api/v1/engine-samples", {"since": since, "until": until, "replica": replica,
                                                      "limit": limit})

    def events(self, *, limit: int = 200) -> list[dict[str, Any]]:
        return self._items("/api/v1/events", {"limit": limit})

    def slos(self) -> list[dict[str, Any]]:
        return self._items("/api/v1/slos")

    def slo_history(self, name: str, *, since: float | None = None, until: float | None = None,
                    step_s: int | None = None) -> dict[str, Any]:
        return self.get(f"/api/v1/slos/{quote(name, safe='')}/history",
                        {"since": since, "until": until, "step_s": step_s})

    def alerts(self, *, slo: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        return self._items("/api/v1/alerts", {"slo": slo, "limit": limit})

    def recommendations(self, *, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        return self._items("/api/v1/recommendations", {"status": status, "limit": limit})

    def actions(self, *, since: float | None = None, until: float | None = None,
                limit: int = 500) -> list[dict[str, Any]]:
        return self._items("/api/v1/actions", {"since": since, "until": until, "limit": limit})

    def cost(self, *, since: float | None = None, until: float | None = None,
             step_s: int | None = None) -> list[dict[str, Any]]:
        return self._items("/api/v1/cost", {"since": since, "until": until, "step_s": step_s})

    def gpu(self, *, since: float | None = None, until: float | None = None) -> dict[str, Any]:
        return self.get("/api/v1/gpu", {"since": since, "until": until})

    # --- actions --------------------------------------------------------------------------------
    def apply(self, rid: int) -> dict[str, Any]:
        return self.post(f"/api/v1/recommendations/{int(rid)}/apply")

    def dismiss(self, rid: int) -> dict[str, Any]:
        return self.post(f"/api/v1/recommendations/{int(rid)}/dismiss")

    def start_search(self, deployment: str, *, canary_trials: int | None = None,
                     target_rps: float | None = None) -> dict[str, Any]:
        body = {k: v for k, v in {"canary_trials": canary_trials, "target_rps": target_rps}.items() if v is not None}
        return self.post(f"/api/v1/deployments/{quote(deployment, safe='')}/search", body)

    def searches(self) -> list[dict[str, Any]]:
        return self._items("/api/v1/searches")
