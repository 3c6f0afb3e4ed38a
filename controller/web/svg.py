"""The timeline picture: geometry from a Timeline (pure), SVG text from a template.

The same geometry is drawn three ways: on the page (marks are SVG links to
the audit record's page), in the HTML report (links to the record's row in
the report itself, so it works offline) and in the PDF (no links: fpdf2 draws
plain shapes). All text comes out of a Jinja2 template with autoescaping, so a
reason like `"><svg onload=...>` stays text inside `<title>`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from jinja2 import Environment
from markupsafe import Markup

from controller.web.timeline import Condition, Timeline

# Segment colours: state words map to fixed colours; other isolation profiles get a
# stable colour of their own from this palette (chosen by a hash of the name, so the
# same profile has the same colour in every report).
FIXED_COLOURS = (("open", "#7fbf7f"), ("unreachable", "#9e9e9e"), ("unknown", "#e0e0e0"),
                 ("isolated:internet", "#d9534f"), ("isolated:full", "#8b1a1a"))
PROFILE_PALETTE = ("#e67e22", "#f0b429", "#8e44ad", "#d35400", "#c27c0e", "#a569bd")
MARK_COLOURS = (("isolate", "#7b0000"), ("restore", "#1b5e20"), ("allow", "#0d47a1"),
                ("stage", "#6a1b9a"), ("plan", "#4a148c"), ("changed", "#e65100"),
                ("drift", "#bf360c"))
TICK_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 2 * 3600, 3 * 3600,
              6 * 3600, 12 * 3600, 86400, 2 * 86400, 7 * 86400, 14 * 86400, 28 * 86400)


def colour(kind: str) -> str:
    for key, value in FIXED_COLOURS:
        if key == kind:
            return value
    digest = hashlib.sha256(kind.encode("utf-8")).digest()
    return PROFILE_PALETTE[digest[0] % len(PROFILE_PALETTE)]


def mark_colour(kind: str) -> str:
    return dict(MARK_COLOURS).get(kind, "#000000")


def kind_label(kind: str) -> str:
    if kind.startswith("isolated:"):
        return f"isolated ({kind.removeprefix('isolated:')})"
    return kind


@dataclass(frozen=True)
class Box:
    x: float
    y: float
    w: float
    h: float
    fill: str
    title: str
    kind: str


@dataclass(frozen=True)
class Pin:
    x: float
    y: float
    h: float
    kind: str
    seq: int
    title: str
    fill: str


@dataclass(frozen=True)
class Bar:
    """An exception's lifetime under the lane."""

    x: float
    y: float
    w: float
    seq: int
    title: str


@dataclass(frozen=True)
class LaneGeometry:
    gateway: str
    y: float
    h: float
    boxes: tuple[Box, ...]
    pins: tuple[Pin, ...]
    bars: tuple[Bar, ...]


@dataclass(frozen=True)
class Tick:
    x: float
    label: str


@dataclass(frozen=True)
class LegendItem:
    label: str
    fill: str


@dataclass(frozen=True)
class Geometry:
    width: float
    height: float
    plot_x: float
    plot_w: float
    top: float
    lanes: tuple[LaneGeometry, ...]
    ticks: tuple[Tick, ...]
    legend: tuple[LegendItem, ...]
    marks_legend: tuple[LegendItem, ...]


def _tick_format(step: int) -> str:
    if step < 60:
        return "%H:%M:%S"
    return "%m-%d %H:%M" if step < 86400 else "%Y-%m-%d"


def ticks(since: float, until: float, plot_x: float, plot_w: float,
          max_ticks: int = 8) -> tuple[Tick, ...]:
    """Round-time ticks (UTC), at most `max_ticks`, at a step from TICK_STEPS."""
    span = until - since
    step = next((s for s in TICK_STEPS if span / s <= max_ticks), TICK_STEPS[-1])
    first = (int(since) // step + 1) * step
    out: list[Tick] = []
    t = first
    while t < until:
        label = dt.datetime.fromtimestamp(t, dt.UTC).strftime(_tick_format(step))
        out.append(Tick(plot_x + (t - since) / span * plot_w, label))
        t += step
    return tuple(out)


def layout(timeline: Timeline, *, width: float = 1000.0, label_w: float = 120.0,
           lane_h: float = 22.0, gap: float = 14.0, top: float = 24.0) -> Geometry:
    """Where everything goes: x from time, one lane of height `lane_h` per gateway."""
    w = timeline.window
    plot_x, plot_w = label_w, width - label_w - 10.0

    def x_of(t: float) -> float:
        return plot_x + (min(max(t, w.since), w.until) - w.since) / w.seconds * plot_w

    lanes: list[LaneGeometry] = []
    for i, lane in enumerate(timeline.lanes):
        y = top + i * (lane_h + gap)
        boxes = tuple(
            Box(x_of(s.start), y, max(x_of(s.end) - x_of(s.start), 0.5), lane_h,
                colour(s.condition.kind), _segment_title(s.condition, s.start, s.end),
                s.condition.kind)
            for s in lane.segments)
        pins = tuple(Pin(x_of(m.at), y - 3, lane_h + 6, m.kind, m.seq, m.title,
                         mark_colour(m.kind))
                     for m in lane.marks if w.since <= m.at <= w.until)
        bars = tuple(
            Bar(x_of(e.opened_at), y + lane_h + 2,
                max(x_of(e.closed_at) - x_of(e.opened_at), 2.0), e.seq,
                f"#{e.seq} exception {e.flow}: {e.reason} (by {e.actor}; closed by "
                f"{e.closed_by})")
            for e in lane.exceptions)
        lanes.append(LaneGeometry(lane.gateway, y, lane_h, boxes, pins, bars))
    height = top + len(lanes) * (lane_h + gap) + 46.0
    legend = tuple(LegendItem(kind_label(k), colour(k)) for k in timeline.kinds())
    used = {p.kind for lane in lanes for p in lane.pins}
    marks_legend = tuple(LegendItem(k, mark_colour(k)) for k, _ in MARK_COLOURS if k in used)
    return Geometry(width, height, plot_x, plot_w, top, tuple(lanes),
                    ticks(w.since, w.until, plot_x, plot_w), legend, marks_legend)


def _segment_title(cond: Condition, start: float, end: float) -> str:
    def fmt(t: float) -> str:
        return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return f"{cond.label} from {fmt(start)} to {fmt(end)}"


def render_svg(env: Environment, geometry: Geometry, *,
               href: Callable[[int], str] | None) -> Markup:
    """The SVG markup; `href(seq)` makes each mark a link (None: plain shapes, for PDF).

    Markup: the template escaped every text already, so a page may embed it as is."""
    return Markup(env.get_template("timeline.svg").render(g=geometry, href=href))  # noqa: S704
