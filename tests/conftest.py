"""Shared fixtures: free ports, the store on SQLite and on the real PostgreSQL, the tiny model."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from controlplane.store.db import make_engine, upgrade
from controlplane.store.repo import Store

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"
PG_ADMIN_URL = os.environ.get("CONTROLPLANE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def new_pg_database() -> Iterator[str]:
    """A new, empty PostgreSQL database, dropped afterwards. In CI it must exist: no silent skip there."""
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"cp_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - any connection failure decides skip vs fail
        admin.dispose()
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is required in CI: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}")
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this session."""
    with new_pg_database() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def bare_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine on an empty database that no migration has touched, on SQLite and on PostgreSQL."""
    with ExitStack() as stack:
        url = (f"sqlite:///{tmp_path / 'bare.db'}" if request.param == "sqlite"
               else stack.enter_context(new_pg_database()))
        engine = make_engine(url)
        stack.callback(engine.dispose)
        yield engine


def _reset(engine: Engine) -> None:
    from controlplane.store.models import Base

    with engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A migrated, empty store on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    else:
        engine = make_engine(request.getfixturevalue("pg_server_url"))
    upgrade(engine)
    _reset(engine)
    yield Store(engine)
    engine.dispose()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    upgrade(engine)
    yield Store(engine)
    engine.dispose()


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny model, built once and cached across sessions in .cache/ (never committed)."""
    from controlplane.engines.tiny_model import make_tiny_model

    path, _ = make_tiny_model(CACHE / "tiny-model")
    return path
