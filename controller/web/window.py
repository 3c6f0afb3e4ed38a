"""The page's and the report's time window from since/until as people type them."""

from __future__ import annotations

from controller.errors import InputError
from controller.timeparse import parse_when
from controller.web.timeline import Window

DEFAULT_SPAN = "24h"
DEFAULT_SECONDS = 24 * 3600.0


def parse_window(since: str | None, until: str | None, now: float) -> Window:
    """[since, until]; until defaults to now, since to 24 h before until."""
    end = parse_when(until, now) if until else now
    start = parse_when(since, now) if since else end - DEFAULT_SECONDS
    if not end > start:
        raise InputError("the window must end after it starts (since < until)")
    return Window(start, end)
