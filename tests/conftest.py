"""Fixtures shared by the suites: the offline wheelhouse (tests/install, the Ansible lab test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.install.wheelhouse import make_wheelhouse

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """drawbridge's wheel (built from this tree) and every dependency of drawbridge[controller],
    re-packed from this venv: `pip install --no-index --find-links` needs no network."""
    base = tmp_path_factory.mktemp("wheelhouse")
    make_wheelhouse([ROOT], ["drawbridge[controller]"], base / "wheels", base / "scratch")
    return base / "wheels"
