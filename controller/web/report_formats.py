"""The report as JSON, CSV and self-contained HTML (the PDF is in report_pdf)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from types import MappingProxyType
from typing import Any

from jinja2 import Environment

from controller.web.report import Report
from controller.web.svg import layout, render_svg
from controller.web.templating import iso

FORMATS = MappingProxyType({"html": "text/html; charset=utf-8", "pdf": "application/pdf",
                            "csv": "text/csv; charset=utf-8", "json": "application/json"})
# A cell starting with one of these is a formula to a spreadsheet; prefixing a quote keeps
# a hostile reason ("=HYPERLINK(...)") as text (OWASP's advice for CSV injection).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def filename(report: Report, fmt: str) -> str:
    def stamp(ts: float) -> str:
        return iso(ts).replace(":", "").replace("-", "")
    return f"drawbridge-report-{stamp(report.since)}-{stamp(report.until)}.{fmt}"


def to_data(report: Report) -> dict[str, Any]:
    """Everything in the report, as plain JSON-able data."""
    return {
        "window": {"since": iso(report.since), "until": iso(report.until),
                   "since_epoch": report.since, "until_epoch": report.until},
        "generated_at": iso(report.generated_at),
        "generated_by": report.generated_by,
        "audit": {
            "verify": report.verify.model_dump(mode="json"),
            "head": dataclasses.asdict(report.head) if report.head else None,
            "checkpoint": dataclasses.asdict(report.checkpoint) if report.checkpoint else None,
            "window_first_seq": report.first_seq,
            "window_last_seq": report.last_seq,
        },
        "gateways": [dataclasses.asdict(g) for g in report.gateways],
        "exceptions": [{**dataclasses.asdict(e), "open_seconds": e.open_seconds,
                        "requested_seconds": e.requested_seconds} for e in report.exceptions],
        "plans": [dataclasses.asdict(p) for p in report.plans],
        "actions": [r.model_dump(mode="json") for r in report.actions],
        "timeline": [{"gateway": lane.gateway,
                      "segments": [{"start": s.start, "end": s.end, "seq": s.seq,
                                    **dataclasses.asdict(s.condition)} for s in lane.segments],
                      "marks": [dataclasses.asdict(m) for m in lane.marks]}
                     for lane in report.timeline.lanes],
    }


def to_json(report: Report) -> str:
    return json.dumps(to_data(report), indent=2, ensure_ascii=False) + "\n"


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_START) else text


def to_csv(report: Report) -> str:
    """Sections, each '# name', a header row and its rows, separated by a blank line."""
    buf = io.StringIO()
    w = csv.writer(buf)

    def section(name: str, header: list[str], rows: list[list[Any]]) -> None:
        w.writerow([f"# {name}"])
        w.writerow(header)
        for row in rows:
            w.writerow([_cell(v) for v in row])
        w.writerow([])

    head = report.head
    section("report", ["since", "until", "generated_at", "generated_by", "audit_ok",
                       "audit_records", "audit_problem", "head_seq", "head_hash",
                       "checkpoint_seq", "checkpoint_hash"],
            [[iso(report.since), iso(report.until), iso(report.generated_at),
              report.generated_by, report.verify.ok, report.verify.records,
              report.verify.problem or "", head.seq if head else "", head.hash if head else "",
              report.checkpoint.seq if report.checkpoint else "",
              report.checkpoint.hash if report.checkpoint else ""]])
    section("time per gateway", ["gateway", "isolated_seconds", "unreachable_seconds",
                                 "unknown_seconds", "isolated_by_profile",
                                 "isolated_at_end"],
            [[g.gateway, round(g.isolated_seconds, 3), round(g.unreachable_seconds, 3),
              round(g.unknown_seconds, 3),
              " ".join(f"{p}={s:.0f}" for p, s in g.by_profile), g.isolated_at_end]
             for g in report.gateways])
    section("exceptions", ["seq", "gateway", "flow", "opened_at", "expires_at", "closed_at",
                           "closed_by", "open_seconds", "actor", "reason", "ticket"],
            [[e.seq, e.gateway, e.flow, iso(e.opened_at), iso(e.expires_at),
              iso(e.closed_at), e.closed_by, round(e.open_seconds, 3), e.actor, e.reason,
              e.ticket or ""] for e in report.exceptions])
    section("actions", ["seq", "time", "actor", "action", "outcome", "targets", "reason",
                        "ticket", "command_id", "prev_hash", "hash"],
            [[r.seq, r.time, r.actor, r.action, r.outcome, " ".join(r.targets), r.reason,
              r.ticket or "", r.command_id or "", r.prev_hash, r.hash]
             for r in report.actions])
    return buf.getvalue()


def to_html(env: Environment, report: Report) -> str:
    """One self-contained file: inline CSS, the timeline inline, links only within it."""
    def anchor(seq: int) -> str:
        return f"#seq-{seq}"

    svg = render_svg(env, layout(report.timeline), href=anchor)
    return env.get_template("report.html").render(r=report, svg=svg, link=anchor)
