"""Console-script entry points of the controller (`drawbridge-controller`, `drawbridge`).

The wheel always installs these scripts (a script cannot depend on an extra), but
their packages come with `drawbridge[controller]`. On an agent-only install (a
gateway) they say what to install instead of ending in an ImportError traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module
from typing import cast

OWN_PACKAGES = ("agent", "controller")


def _main_of(module: str, prog: str) -> Callable[[], None]:
    try:
        loaded = import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if not missing or missing.partition(".")[0] in OWN_PACKAGES:
            raise  # a broken install of our own code: the traceback is the useful report
        sys.stderr.write(
            f"{prog}: this needs the controller's packages (no module named {missing!r}).\n"
            f"Install drawbridge[controller], e.g.: pip install 'drawbridge[controller]'\n")
        raise SystemExit(1) from None
    return cast(Callable[[], None], loaded.main)


def server() -> None:
    """`drawbridge-controller`: the controller service and its host-side commands."""
    _main_of("controller.server_cli", "drawbridge-controller")()


def cli() -> None:
    """`drawbridge`: the engineers' command line against the controller's API."""
    _main_of("controller.cli", "drawbridge")()
