"""Fixtures shared by the unit, install and lab suites.

Storage: every test that touches the controller's database runs once on SQLite and
once on a real PostgreSQL server that this test run starts (drawbridge_lab.postgres)
and removes at the end. `--store sqlite` or `--store postgresql` (or
DRAWBRIDGE_TEST_STORES=sqlite) narrows the run to one store. Where PostgreSQL is not
installed its half is skipped with the reason; in CI (CI=true) it must run.

Packages: the offline wheelhouse (tests/install, the Ansible lab test).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from drawbridge_lab.postgres import PostgresServer, PostgresUnavailable, unavailable_reason
from tests.install.wheelhouse import make_wheelhouse

ROOT = Path(__file__).resolve().parent.parent
STORES = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """drawbridge's wheel (built from this tree) and every dependency of drawbridge[controller],
    re-packed from this venv: `pip install --no-index --find-links` needs no network."""
    base = tmp_path_factory.mktemp("wheelhouse")
    make_wheelhouse([ROOT], ["drawbridge[controller]"], base / "wheels", base / "scratch")
    return base / "wheels"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--store", action="append", choices=STORES, default=None,
                     help="run storage tests on this store only (repeatable; default: both)")


def selected_stores(config: pytest.Config) -> tuple[str, ...]:
    chosen = config.getoption("--store")
    if chosen:
        return tuple(chosen)
    env = os.environ.get("DRAWBRIDGE_TEST_STORES", "")
    names = tuple(s.strip() for s in env.split(",") if s.strip() in STORES)
    return names or STORES


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store_kind" in metafunc.fixturenames:
        # session scope: a module-scoped rig (the lab fleet) is built once per store
        metafunc.parametrize("store_kind", selected_stores(metafunc.config), indirect=True,
                             scope="session")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL cluster for the whole run."""
    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get("CI"):
            raise pytest.UsageError(f"the PostgreSQL tests must run in CI, but {reason}")
        pytest.skip(reason)
    try:
        server = PostgresServer.start()
    except PostgresUnavailable as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def store_kind(request: pytest.FixtureRequest) -> str:
    """Which store this test runs on (parametrized: sqlite, postgresql)."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def db_url(store_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty database on the store under test."""
    if store_kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'controller.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = f"t_{secrets.token_hex(6)}"
    url = server.create_database(name)
    try:
        yield url
    finally:
        server.drop_database(name)


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh database on the PostgreSQL server, for tests only PostgreSQL can run."""
    name = f"t_{secrets.token_hex(6)}"
    url = postgres_server.create_database(name)
    try:
        yield url
    finally:
        postgres_server.drop_database(name)
