"""The API client: errors the pages can show as they are (which URL, what status, the plane's own detail)."""

from __future__ import annotations

import socket

import httpx
import pytest

from controlplane.ui.client import NotAvailable, PlaneClient, PlaneError, PlaneUnreachable
from controlplane.ui.launch import APP_SCRIPT, streamlit_argv
from controlplane.ui.nav import PAGES, client_settings
from tests.unit.ui.plane import TOKEN, Seeded


def test_reads_go_to_the_plane_and_come_back_as_items(plane: tuple[str, Seeded]) -> None:
    client = PlaneClient(plane[0])
    assert client.health()["status"] == "ok"
    assert {r["name"] for r in client.replicas()} >= {"tiny-0", "watched-a"}
    page = client.requests(limit=5)
    assert page["count"] == 5 and len(page["items"]) == 5


def test_a_route_the_plane_lacks_is_not_available_but_an_unknown_object_is_the_planes_404(
        plane: tuple[str, Seeded]) -> None:
    client = PlaneClient(plane[0])
    with pytest.raises(NotAvailable) as missing:
        client.get("/api/v1/no-such-thing")
    assert missing.value.status == 404 and "/api/v1/no-such-thing" in str(missing.value)
    with pytest.raises(PlaneError) as unknown:
        client.get("/api/v1/recommendations/999")
    assert not isinstance(unknown.value, NotAvailable)
    assert unknown.value.status == 404 and unknown.value.detail == "no recommendation 999"


def test_bad_parameters_come_back_with_the_planes_detail(plane: tuple[str, Seeded]) -> None:
    with pytest.raises(PlaneError) as bad:
        PlaneClient(plane[0]).recommendations(status="bogus")
    assert bad.value.status == 422 and "status" in bad.value.detail


def test_mutations_send_the_bearer_token_only_when_configured(plane: tuple[str, Seeded]) -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"id": 1, "status": "dismissed", "items": []})

    PlaneClient("http://plane", TOKEN, transport=httpx.MockTransport(handler)).dismiss(1)
    PlaneClient("http://plane", None, transport=httpx.MockTransport(handler)).dismiss(1)
    PlaneClient("http://plane", TOKEN, transport=httpx.MockTransport(handler)).recommendations()
    assert seen == [f"Bearer {TOKEN}", None, None]


def test_a_token_no_header_can_carry_makes_the_client_read_only_instead_of_failing_at_apply() -> None:
    sent: list[httpx.Request] = []

    def answer(r: httpx.Request) -> httpx.Response:
        sent.append(r)
        return httpx.Response(401, json={"detail": "missing or wrong bearer token"})

    client = PlaneClient("http://plane", "sécret", transport=httpx.MockTransport(answer))
    assert client.token_refused and client.token is None
    with pytest.raises(PlaneError, match="401"):
        client.post("/api/v1/recommendations/1/apply")  # sent without a token: the plane says no, no traceback
    assert "authorization" not in sent[0].headers
    assert not PlaneClient("http://plane", "s3cret").token_refused


def test_an_unreachable_plane_names_its_url() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(PlaneUnreachable) as exc:
        PlaneClient(url).slos()
    assert exc.value.base_url == url and "CONTROLPLANE_API_URL" in str(exc.value)


def test_a_non_json_or_misshapen_answer_is_an_error_not_a_crash() -> None:
    client = PlaneClient("http://plane", transport=httpx.MockTransport(lambda r: httpx.Response(200, text="<html>")))
    with pytest.raises(PlaneError, match="not JSON"):
        client.health()
    odd = PlaneClient("http://plane", transport=httpx.MockTransport(lambda r: httpx.Response(200, json={"x": 1})))
    with pytest.raises(PlaneError, match="'items'"):
        odd.slos()


def test_settings_come_from_the_command_line_then_the_environment_then_the_default() -> None:
    env = {"CONTROLPLANE_API_URL": "http://env:1/", "CONTROLPLANE_API_TOKEN": "t"}
    assert client_settings(env, "http://cli:2") == ("http://cli:2", "t")
    assert client_settings(env) == ("http://env:1", "t")
    assert client_settings({"CONTROLPLANE_API_TOKEN": ""}) == ("http://127.0.0.1:8080", None)


def test_streamlit_argv_runs_the_app_script_headless_on_loopback_with_the_api_url() -> None:
    argv = streamlit_argv("http://127.0.0.1:9090", port=8600)
    assert argv[1:5] == ["-m", "streamlit", "run", str(APP_SCRIPT)] and APP_SCRIPT.is_file()
    opts = dict(zip(argv[5:-3:2], argv[6:-3:2], strict=True))
    assert opts["--server.address"] == "127.0.0.1" and opts["--server.port"] == "8600"
    assert opts["--server.headless"] == "true"
    assert argv[-3:] == ["--", "--api-url", "http://127.0.0.1:9090"]


@pytest.mark.parametrize(("kwargs", "word"), [({"api_url": "127.0.0.1:8080"}, "api_url"),
                                              ({"api_url": "http://x", "port": 0}, "port"),
                                              ({"api_url": "http://localhost:80x"}, "not a usable URL"),
                                              ({"api_url": "http://:8080"}, "no host")])
def test_streamlit_argv_refuses_bad_arguments(kwargs: dict[str, object], word: str) -> None:
    with pytest.raises(ValueError, match=word):
        streamlit_argv(**kwargs)  # type: ignore[arg-type]


def test_page_url_paths_are_unique() -> None:
    paths = [p.url_path for p in PAGES]
    assert len(set(paths)) == len(paths) == 8
