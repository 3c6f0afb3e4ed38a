"""Fresh venvs for install tests, and what is installed in them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

AGENT_DEPENDENCIES = {"pydantic", "typer", "rich", "apscheduler", "prometheus-client", "scapy"}
# the controller's web, database and SSH-client stack, its page and report, dev tools
NOT_ON_A_GATEWAY = {"fastapi", "uvicorn", "starlette", "sqlalchemy", "alembic", "psycopg",
                    "psycopg2", "psycopg-binary", "paramiko", "httpx", "jinja2",
                    "python-multipart", "fpdf2", "pillow", "playwright", "drawbridge-lab"}


def fresh_venv(path: Path, wheelhouse: Path, requirement: str) -> Path:
    """A venv with only `requirement` (and what it pulls in) installed; returns its bin/."""
    # without pip of its own: this venv's pip installs into it (--python), which saves
    # seconds of ensurepip per venv
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(path / "bin" / "python"),
                    "install", "-q", "--no-index", "--find-links", str(wheelhouse), requirement],
                   check=True, capture_output=True, text=True)
    return path / "bin"


def installed(bin_dir: Path) -> set[str]:
    code = ("import importlib.metadata as m, json, re; print(json.dumps(sorted("
            "re.sub(r'[-_.]+', '-', d.metadata['Name']).lower() for d in m.distributions())))")
    out = subprocess.run([bin_dir / "python", "-c", code], capture_output=True, text=True,
                         check=True).stdout
    return set(json.loads(out))
