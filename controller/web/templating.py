"""The Jinja2 environment of the page and the reports, and the text filters they share.

Autoescaping is on for every template (HTML and SVG alike): text from the
database (reasons, actors, tickets, error messages) can never become markup.
Invisible format characters (bidi overrides such as U+202E, zero-width
characters) are shown as `[U+202E]`, so a reason cannot make the text around
it read backwards, or hide a word, in the page, the HTML report or the PDF.
"""

from __future__ import annotations

import datetime as dt
import unicodedata

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape


def visible(text: object) -> str:
    """`text` with format (Cf) and other control characters spelled out."""
    out: list[str] = []
    for ch in "" if text is None else str(text):
        if unicodedata.category(ch) in ("Cf", "Cc", "Co", "Cs") and ch not in "\t":
            out.append(f"[U+{ord(ch):04X}]")
        else:
            out.append(ch)
    return "".join(out)


def when(ts: float | None) -> str:
    """Epoch seconds as UTC time, to the second ('-' when unknown)."""
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def iso(ts: float) -> str:
    """Epoch seconds as an ISO time a person can paste back into since/until."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def duration(seconds: float | None) -> str:
    """'2d 03h 04m', '1h 02m 03s', '45s'."""
    if seconds is None:
        return "-"
    total = max(0, round(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def make_env() -> Environment:
    env = Environment(
        loader=PackageLoader("controller.web", "templates"),
        autoescape=select_autoescape(enabled_extensions=("html", "svg", "xml"),
                                     default_for_string=True, default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["t"] = visible
    env.filters["when"] = when
    env.filters["iso"] = iso
    env.filters["duration"] = duration
    return env
