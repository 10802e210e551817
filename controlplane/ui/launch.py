"""How the `controlplane ui` command starts the app: `streamlit run dashboards/app.py` with its options."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx

APP_SCRIPT = Path(__file__).resolve().parents[2] / "dashboards" / "app.py"


def streamlit_argv(api_url: str, host: str = "127.0.0.1", port: int = 8501) -> list[str]:
    """The argv to exec. The API URL reaches the app as its own `--api-url` argument (after `--`), which wins
    over CONTROLPLANE_API_URL; the token stays in the environment (CONTROLPLANE_API_TOKEN), never in argv.

    Streamlit runs as a module of this interpreter so it is the venv's Streamlit; headless (no browser
    opened), usage statistics off, loopback by default like every face of the plane.
    """
    if not 0 < port < 65536:
        raise ValueError(f"port must be in 1..65535, got {port}")
    if not api_url.startswith(("http://", "https://")):
        raise ValueError(f"api_url must be an http(s) URL, got {api_url!r}")
    try:  # as the app's client will parse it: a bad port or no host is named here, not in the browser
        url = httpx.URL(api_url)
        url.port  # noqa: B018 - parsing the port is the check
    except (httpx.InvalidURL, ValueError) as exc:
        raise ValueError(f"api_url is not a usable URL: {exc}") from None
    if not url.host:
        raise ValueError(f"api_url names no host: {api_url!r}")
    if url.port is not None and not 1 <= url.port <= 65535:  # httpx takes 99999; 0 is any port, reached on none
        raise ValueError(f"api_url's port {url.port} is not in 1..65535; give the port the API listens on")
    return [sys.executable, "-m", "streamlit", "run", str(APP_SCRIPT), "--server.headless", "true",
            "--server.address", host, "--server.port", str(port), "--browser.gatherUsageStats", "false",
            "--client.toolbarMode", "viewer", "--", "--api-url", api_url]

