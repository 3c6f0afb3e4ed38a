"""The report as PDF (fpdf2): the same content as the HTML report, the timeline drawn
from the same SVG (without links: fpdf2 draws shapes and text, not anchors).

A Unicode font (DejaVu, Debian's fonts-dejavu-core) is used when it is installed;
otherwise the PDF core font, with characters outside Latin-1 replaced by '?'.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path

from fpdf import FPDF
from fpdf.fonts import FontFace
from jinja2 import Environment

from controller.web.report import Report
from controller.web.svg import layout, render_svg
from controller.web.templating import duration, visible, when

FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"),)
FONT_FILES = (("", "DejaVuSans.ttf"), ("B", "DejaVuSans-Bold.ttf"))
MONO_FILE = "DejaVuSansMono.ttf"


class _Writer:
    """An FPDF document with the report's fonts and a few helpers."""

    def __init__(self) -> None:
        self.pdf = FPDF(orientation="L", unit="mm", format="A4")
        self.pdf.set_auto_page_break(auto=True, margin=12)
        self.pdf.set_margins(10, 10, 10)
        self.unicode = False
        self.family, self.mono = "helvetica", "courier"
        for folder in FONT_DIRS:
            if all((folder / name).is_file() for _, name in FONT_FILES) \
                    and (folder / MONO_FILE).is_file():
                for style, name in FONT_FILES:
                    self.pdf.add_font("dejavu", style=style, fname=str(folder / name))
                self.pdf.add_font("dejavumono", fname=str(folder / MONO_FILE))
                self.family, self.mono, self.unicode = "dejavu", "dejavumono", True
                break
        self.pdf.set_font(self.family, size=9)

    def text(self, value: object) -> str:
        shown = visible(value)
        if not self.unicode:
            shown = shown.encode("latin-1", "replace").decode("latin-1")
        return shown

    def heading(self, title: str) -> None:
        self.pdf.ln(2)
        self.pdf.set_font(self.family, "B", 12)
        self.pdf.cell(0, 7, self.text(title), new_x="LMARGIN", new_y="NEXT")
        self.pdf.set_font(self.family, size=9)

    def para(self, value: str, *, mono: bool = False) -> None:
        self.pdf.set_font(self.mono if mono else self.family, size=8 if mono else 9)
        self.pdf.multi_cell(0, 4.5, self.text(value), new_x="LMARGIN", new_y="NEXT")
        self.pdf.set_font(self.family, size=9)

    def table(self, header: Sequence[str], rows: Sequence[Sequence[object]],
              widths: Sequence[float]) -> None:
        self.pdf.set_font(self.family, size=7.5)
        with self.pdf.table(col_widths=tuple(widths), text_align="LEFT", line_height=3.6,
                            headings_style=FontFace(emphasis="BOLD", fill_color=(235, 235, 235)),
                            width=self.pdf.epw) as table:
            head = table.row()
            for title in header:
                head.cell(self.text(title))
            for row in rows:
                cells = table.row()
                for value in row:
                    cells.cell(self.text(value))
        self.pdf.set_font(self.family, size=9)


def to_pdf(env: Environment, report: Report) -> bytes:
    w = _Writer()
    pdf = w.pdf
    pdf.set_title("Drawbridge incident report")
    pdf.set_creator("drawbridge")
    pdf.add_page()
    pdf.set_font(w.family, "B", 16)
    pdf.cell(0, 9, "Drawbridge incident report", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font(w.family, size=9)
    span = (f"#{report.first_seq} to #{report.last_seq} ({len(report.actions)})"
            if report.actions else "none")
    w.para(f"Window: {when(report.since)} to {when(report.until)} "
           f"({duration(report.until - report.since)}). Generated {when(report.generated_at)} "
           f"by {report.generated_by}. Audit records in the window: {span}.")

    w.heading("Audit chain")
    v = report.verify
    w.para("audit verify: " + (f"intact: {v.records} records, chain verified" if v.ok else
                               f"FAILED at record #{v.first_bad_seq}: {v.problem}"))
    head = report.head
    w.para(f"head: #{head.seq} {head.hash}" if head else "head: none (empty log)", mono=True)
    cp = report.checkpoint
    w.para(f"last checkpoint: #{cp.seq} {cp.hash} at {when(cp.at)} ({cp.where})" if cp
           else "last checkpoint: none", mono=True)

    w.heading("Timeline")
    geometry = layout(report.timeline, width=1000.0)
    svg = str(render_svg(env, geometry, href=None))
    width = pdf.epw
    height = width * geometry.height / geometry.width
    if pdf.get_y() + height > pdf.h - pdf.b_margin:
        pdf.add_page()
    # fpdf2 logs every SVG feature it skips; the picture has none it needs
    logging.getLogger("fpdf.svg").setLevel(logging.ERROR)
    pdf.image(io.BytesIO(svg.encode("utf-8")), x=pdf.l_margin, y=pdf.get_y(), w=width)
    pdf.set_y(pdf.get_y() + height + 2)

    w.heading("Time per gateway")
    w.table(["gateway", "isolated", "by profile", "unreachable", "unknown", "at the end"],
            [[g.gateway, duration(g.isolated_seconds),
              ", ".join(f"{p}: {duration(s)}" for p, s in g.by_profile),
              duration(g.unreachable_seconds), duration(g.unknown_seconds),
              "isolated" if g.isolated_at_end else "not isolated"] for g in report.gateways],
            [30, 25, 80, 25, 25, 25])

    w.heading("Exceptions (what was let through)")
    if report.exceptions:
        w.table(["seq", "gateway", "flow", "opened", "asked for", "open for", "closed by",
                 "by", "reason", "ticket"],
                [[f"#{e.seq}", e.gateway, e.flow, when(e.opened_at),
                  duration(e.requested_seconds), duration(e.open_seconds), e.closed_by,
                  e.actor, e.reason, e.ticket or ""] for e in report.exceptions],
                [12, 20, 45, 32, 18, 18, 22, 22, 60, 28])
    else:
        w.para("No exception was open in this window.")

    w.heading("Restore plans")
    if report.plans:
        for p in report.plans:
            w.para(f"{p.name} (plan {p.plan_id}, #{p.seq}"
                   + (f" to #{p.end_seq}" if p.end_seq else "") + f"): {p.state}; started "
                   f"{when(p.started_at)} by {p.actor}: {p.reason}"
                   + (f" [{p.ticket}]" if p.ticket else "") + (f"; {p.note}" if p.note else ""))
            w.table(["#", "stage", "state", "gateways", "record", "note"],
                    [[i + 1, s.name, s.state, ", ".join(s.gateways),
                      f"#{s.seq}" if s.seq else "", s.note] for i, s in enumerate(p.stages)],
                    [8, 60, 30, 60, 20, 99])
    else:
        w.para("No restore plan in this window.")

    w.heading("Actions")
    w.table(["seq", "time (UTC)", "actor", "action", "outcome", "gateways", "reason", "ticket",
             "hash"],
            [[f"#{a.seq}", a.time[:19].replace("T", " "), a.actor, a.action, a.outcome,
              ", ".join(a.targets), a.reason, a.ticket or "", a.hash] for a in report.actions],
            [12, 30, 24, 24, 18, 30, 70, 20, 49])
    return bytes(pdf.output())
