"""Fixtures of the lab suite: real network namespaces, real nftables, real processes.

Every test under tests/lab is skipped, with the reason, when this machine cannot
run the lab (not root, no ``ip netns``, no usable ``nft`` inside a namespace).
Leftovers of earlier crashed runs are removed once per session, but only those
whose creating process is dead: a concurrently running session keeps its labs.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from drawbridge_lab import Lab, cleanup_stale
from drawbridge_lab.postgres import PostgresServer
from tests.lab.agent_rig import MGMT_PORT, AgentRig

LAB_TESTS = Path(__file__).resolve().parent


@functools.cache
def lab_unusable_reason() -> str | None:
    """None when namespaces and nft work here, else why the lab suite is skipped."""
    if os.uname().sysname != "Linux":
        return "the namespace lab needs Linux"
    if os.geteuid() != 0:
        return "the namespace lab needs root (creates network namespaces)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"the namespace lab needs `{tool}` on PATH"
    # Named like a lab run so that cleanup_stale() can remove it if we crash here.
    name = f"dbl-{os.getpid()}-{secrets.token_hex(3)}-check"
    try:
        steps = (
            ["ip", "netns", "add", name],
            ["ip", "-n", name, "link", "set", "lo", "up"],
            ["ip", "netns", "exec", name, "nft", "list", "ruleset"],
        )
        for argv in steps:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
            if proc.returncode != 0:
                return f"`{' '.join(argv[:4])}` unusable here: {proc.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"network namespaces unusable here: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    lab_items = [item for item in items if LAB_TESTS in Path(str(item.path)).resolve().parents]
    if not lab_items:
        return
    reason = lab_unusable_reason()
    if reason is None:
        return
    if os.environ.get("CI"):  # in CI a skipped lab would hide every real test
        raise pytest.UsageError(f"the lab suite must run in CI, but {reason}")
    marker = pytest.mark.skip(reason=reason)
    for item in lab_items:
        item.add_marker(marker)


@pytest.fixture(scope="session", autouse=True)
def _lab_leftovers() -> None:
    """Remove namespaces of earlier lab runs whose process died (never live ones)."""
    if lab_unusable_reason() is None:
        cleanup_stale()


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A fresh one-gateway lab, destroyed after the test (even when it fails)."""
    with Lab.create(gateways=1) as built:
        yield built


@pytest.fixture
def lab_factory() -> Iterator[Callable[..., Lab]]:
    """``lab_factory(gateways=3)`` builds more labs; all are destroyed after the test."""
    labs: list[Lab] = []

    def make(gateways: int = 1, prefix: str | None = None, *, services: bool = True) -> Lab:
        built = Lab.create(gateways=gateways, prefix=prefix, services=services)
        labs.append(built)
        return built

    yield make
    for built in labs:
        built.destroy()


@pytest.fixture
def rig(lab: Lab, tmp_path: Path) -> Iterator[AgentRig]:
    """A lab gateway with a Drawbridge agent config (the daemon is started by the test)."""
    lab.start_services(lab.gateways[0].ns, tcp=[MGMT_PORT])
    agent = AgentRig(lab, lab.gateways[0], tmp_path)
    yield agent
    agent.stop_daemon()


@pytest.fixture(scope="module")
def database_url(store_kind: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """The controller's database for a module's fleet: "" (SQLite in its state dir, the
    default) or a fresh database on the run's PostgreSQL server (parametrized)."""
    if store_kind == "sqlite":
        yield ""
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = f"lab_{secrets.token_hex(4)}"
    url = server.create_database(name)
    yield url
    server.drop_database(name)
