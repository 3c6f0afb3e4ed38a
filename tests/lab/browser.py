"""Debian's Chromium, driven by Playwright, inside a lab namespace.

Playwright starts the browser itself and talks to it over a pipe; a tiny wrapper
script (`ip netns exec NS chromium "$@"`) puts the browser in the management
namespace, where the controller listens, and keeps the pipe. No browser is ever
downloaded: the one from the distribution is used.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REPO = Path(__file__).resolve().parents[2]


def artifacts_dir() -> Path:
    """Screenshots and other evidence kept after the run (gitignored)."""
    path = Path(os.environ.get("DRAWBRIDGE_TEST_ARTIFACTS") or REPO / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def unavailable() -> str | None:
    if not Path(CHROMIUM).exists():
        return "Debian's chromium is not installed (make deps installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (make venv installs it)"
    return None


@contextmanager
def browser_in(ns: str, workdir: Path) -> Iterator[Any]:
    """A headless Chromium whose network is namespace `ns`."""
    from playwright.sync_api import sync_playwright

    wrapper = workdir / "chromium-in-netns"
    wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {ns} {CHROMIUM} "$@"\n')
    wrapper.chmod(0o755)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(wrapper), args=ARGS, timeout=60_000)
        try:
            yield browser
        finally:
            browser.close()
