"""The production wheel in fresh venvs: `drawbridge` is the agent and only the agent's
dependencies; `drawbridge[controller]` adds the controller; `--version` everywhere.

Installs run offline from the session's wheelhouse (tests/conftest.py).
"""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.install.venvs import AGENT_DEPENDENCIES, NOT_ON_A_GATEWAY, fresh_venv, installed

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=60,
                          check=False)


@pytest.fixture(scope="module")
def agent_venv(wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fresh_venv(tmp_path_factory.mktemp("agent") / "venv", wheelhouse, "drawbridge")


@pytest.fixture(scope="module")
def controller_venv(wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fresh_venv(tmp_path_factory.mktemp("controller") / "venv", wheelhouse,
                      "drawbridge[controller]")


def test_agent_install_has_only_the_agents_dependencies(agent_venv: Path) -> None:
    dists = installed(agent_venv)
    assert AGENT_DEPENDENCIES | {"drawbridge"} <= dists
    assert not dists & NOT_ON_A_GATEWAY, f"pulled onto a gateway: {dists & NOT_ON_A_GATEWAY}"


def test_agent_runs_from_the_agent_only_install(agent_venv: Path) -> None:
    proc = run(agent_venv / "drawbridge-agent", "--version")
    assert (proc.returncode, proc.stdout) == (0, f"drawbridge-agent {VERSION}\n"), proc.stderr
    # every agent module imports with the agent's dependencies alone
    code = ("import importlib, pkgutil, agent\n"
            "for m in pkgutil.walk_packages(agent.__path__, 'agent.'):\n"
            "    importlib.import_module(m.name)\n")
    proc = run(agent_venv / "python", "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert run(agent_venv / "drawbridge-agent", "--help").returncode == 0


@pytest.mark.parametrize("script", ["drawbridge", "drawbridge-controller"])
def test_controller_scripts_without_the_extra_say_what_to_install(
        agent_venv: Path, script: str) -> None:
    proc = run(agent_venv / script, "--version")
    assert proc.returncode == 1
    assert "drawbridge[controller]" in proc.stderr and "Traceback" not in proc.stderr


def test_controller_extra_runs_both_commands(controller_venv: Path) -> None:
    assert {"fastapi", "uvicorn", "sqlalchemy", "alembic", "paramiko", "httpx"} \
        <= installed(controller_venv)
    assert "drawbridge-lab" not in installed(controller_venv)
    for script in ("drawbridge-controller", "drawbridge", "drawbridge-agent"):
        proc = run(controller_venv / script, "--version")
        assert (proc.returncode, proc.stdout) == (0, f"{script} {VERSION}\n"), proc.stderr
    # every controller module imports; the page's templates are in the wheel
    code = ("import importlib, pathlib, pkgutil, controller, controller.web\n"
            "for m in pkgutil.walk_packages(controller.__path__, 'controller.'):\n"
            "    importlib.import_module(m.name)\n"
            "print(len(list(pathlib.Path(controller.web.__path__[0]).glob('templates/*'))))\n")
    proc = run(controller_venv / "python", "-c", code)
    assert proc.returncode == 0, proc.stderr
    shipped = len(list((ROOT / "controller" / "web" / "templates").iterdir()))
    assert int(proc.stdout) == shipped > 0


def test_units_documentation_is_installed(agent_venv: Path) -> None:
    """The units' Documentation= points into the documented venv: the wheel puts it there."""
    venv = agent_venv.parent
    for unit in (ROOT / "deploy" / "systemd").glob("*.service"):
        docs = [line.split("=", 1)[1] for line in unit.read_text().splitlines()
                if line.startswith("Documentation=")]
        assert docs, unit
        for uri in docs:
            assert uri.startswith("file:///opt/drawbridge/venv/"), uri
            path = venv / uri.removeprefix("file:///opt/drawbridge/venv/")
            assert path.is_file(), f"{unit.name}: {uri} is not installed by the wheel"
