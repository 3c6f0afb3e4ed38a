"""The package version: read from the installed distribution's metadata, so
pyproject.toml stays its one definition. Shared by the agent, the controller and
the CLIs (`--version`, the `drawbridge_agent_info` metric)."""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

import typer

DISTRIBUTION = "drawbridge"


def package_version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # a source tree on sys.path that was never installed
        return "unknown"


def version_callback(prog: str) -> Callable[[bool], None]:
    """A Typer `--version` callback that prints `PROG VERSION` and exits 0."""

    def show(value: bool) -> None:
        if value:
            print(f"{prog} {package_version()}")
            raise typer.Exit()

    return show
