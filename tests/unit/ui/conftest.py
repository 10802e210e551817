"""Fixtures for the app's tests: a seeded plane over HTTP, and the app pointed at it."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

from tests.unit.ui.plane import TOKEN, Seeded, seed, serve

APP = Path(__file__).resolve().parents[3] / "dashboards" / "app.py"


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Seeded]]:
    """Shared by a module's read-only tests; tests that change the plane use `fresh_plane`."""
    seeded = seed(tmp_path_factory.mktemp("plane") / "store.db")
    with serve(seeded) as url:
        yield url, seeded


@pytest.fixture
def fresh_plane(tmp_path: Path) -> Iterator[tuple[str, Seeded]]:
    seeded = seed(tmp_path / "store.db")
    with serve(seeded) as url:
        yield url, seeded


OpenPage = Callable[..., AppTest]


@pytest.fixture
def open_page(monkeypatch: pytest.MonkeyPatch) -> OpenPage:
    """open_page(url, page, token=TOKEN): the app's entry script run once on that page."""

    def run(url: str, page: str, token: str | None = TOKEN) -> AppTest:
        monkeypatch.setenv("CONTROLPLANE_API_URL", url)
        if token is None:
            monkeypatch.delenv("CONTROLPLANE_API_TOKEN", raising=False)
        else:
            monkeypatch.setenv("CONTROLPLANE_API_TOKEN", token)
        at = AppTest.from_file(str(APP), default_timeout=60)
        at.query_params["page"] = page
        return at.run()

    return run


def frames(at: AppTest) -> list[pd.DataFrame]:
    return [d.value for d in at.dataframe]


def cells(at: AppTest) -> set[str]:
    """Every cell of every table on the page, as text."""
    return {str(v) for df in frames(at) for v in df.to_numpy().ravel()}


def charts(at: AppTest) -> list[tuple[dict[str, Any], list[pd.DataFrame]]]:
    """Each Vega-Lite (Altair) chart: its spec and its datasets."""
    out = []
    for el in at.get("vega_lite_chart"):
        proto: Any = el.proto
        data = [pa.ipc.open_stream(d.data.data).read_all().to_pandas() for d in proto.datasets]
        out.append((json.loads(proto.spec), data))
    return out


def texts(at: AppTest) -> str:
    """The page's messages, captions, markdown and metric values as one string (for `in` checks)."""
    parts = [e.value for kind in ("markdown", "caption", "info", "warning", "error", "success", "title",
                                  "subheader") for e in at.get(kind) if hasattr(e, "value")]
    parts += [f"{m.label}={m.value}" for m in at.metric]
    return "\n".join(str(p) for p in parts)
