"""The incident report (pure aggregation) and its formats: JSON, CSV, HTML, PDF."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from controller.audit import VerifyReport
from controller.web.report import ChainHead, Report, build_report, gateway_times
from controller.web.report_formats import filename, to_csv, to_data, to_html
from controller.web.report_pdf import to_pdf
from controller.web.sources import Checkpoint, plan_view
from controller.web.templating import duration, make_env, visible
from controller.web.timeline import Window, build_timeline
from tests.unit.web_records import T0, allow_args, drill, drill_plan, rec, results

W = Window(T0, T0 + 1800)
HOSTILE = ("<script>alert(1)</script>", '"><svg onload=alert(2)>', "all clear \u202eevil")


def report(records=None, *, checkpoint=None) -> Report:  # type: ignore[no-untyped-def]
    records = drill() if records is None else records
    tl = build_timeline(records, ["gw0", "gw1"], W)
    return build_report(timeline=tl, records=records,
                        verify=VerifyReport(ok=True, records=len(records), last_seq=9),
                        head=ChainHead(9, "ab" * 32), checkpoint=checkpoint,
                        plans=[plan_view(drill_plan())], generated_at=T0 + 2000,
                        generated_by="lead (viewer)")


def hostile_records():  # type: ignore[no-untyped-def]
    out = []
    for i, reason in enumerate(HOSTILE):
        out.append(rec(10 + i, 100 + i, "isolate", "ok", ["gw0"], reason=reason,
                       ticket="INC-9", detail={"results": results(["gw0"], "isolated")}))
    out.append(rec(13, 200, "allow", "ok", ["gw0"], reason=HOSTILE[1],
                   detail={"args": allow_args(), "results": results(["gw0"], "isolated")}))
    return out


def test_time_isolated_per_gateway_by_profile_and_unreachable() -> None:
    gw0, gw1 = gateway_times(report().timeline)
    assert gw0.isolated_seconds == pytest.approx(1200 - 61)
    assert dict(gw0.by_profile) == pytest.approx({"internet": 940, "casefiles": 199})
    assert gw0.unreachable_seconds == 0 and gw0.unknown_seconds == pytest.approx(61)
    assert gw1.isolated_seconds == pytest.approx(1200 - 61)  # unreachable, still isolated
    assert gw1.unreachable_seconds == pytest.approx(400)
    assert not gw0.isolated_at_end


def test_exceptions_and_their_durations() -> None:
    (e,) = report().exceptions
    assert (e.seq, e.gateway, e.requested_seconds, e.closed_by) == (3, "gw0", 3600,
                                                                      "restore #8")
    assert e.open_seconds == pytest.approx(900)


def test_actions_are_the_window_s_records_in_seq_order() -> None:
    outside = rec(99, 5000, "isolate", "ok", ["gw0"])
    r = report([*drill(), outside])
    assert [a.seq for a in r.actions] == list(range(1, 10))
    assert (r.first_seq, r.last_seq) == (1, 9)


def test_plan_progress_from_the_stored_plan() -> None:
    plan = plan_view(drill_plan())
    assert (plan.plan_id, plan.name, plan.state, plan.seq) == ("p1", "reconnect", "done", 6)
    assert [(s.name, s.state) for s in plan.stages] == [("case files", "done"),
                                                       ("everything", "done")]
    doc = drill_plan(state="running", current=1)
    waiting = doc.with_stage(doc.stage(1).model_copy(update={
        "state": "awaiting approval", "gate": "approval"}))
    shown = plan_view(waiting)
    assert shown.state == "running" and "awaits approval" in shown.note
    assert [s.state for s in shown.stages] == ["done", "awaiting approval"]
    paused = plan_view(waiting.model_copy(update={"state": "paused"}))
    assert [s.state for s in paused.stages] == ["done", "paused"]
    failed = doc.with_stage(doc.stage(1).model_copy(update={
        "state": "failed", "note": "gw1: unverified"})).model_copy(update={
            "state": "failed", "note": "stage 'everything' failed"})
    shown = plan_view(failed)
    assert shown.state == "failed" and "failed" in shown.note
    assert [s.state for s in shown.stages] == ["done", "failed"]
    running = doc.with_stage(doc.stage(1).model_copy(update={"state": "sending"}))
    assert [s.state for s in plan_view(running).stages] == ["done", "running"]


def test_json_has_everything_with_seqs_and_the_head() -> None:
    data = json.loads(json.dumps(to_data(report())))
    assert data["audit"]["head"] == {"seq": 9, "hash": "ab" * 32}
    assert data["audit"]["checkpoint"] is None
    assert [a["seq"] for a in data["actions"]] == list(range(1, 10))
    assert data["exceptions"][0]["open_seconds"] == pytest.approx(900)
    assert data["gateways"][1]["unreachable_seconds"] == pytest.approx(400)
    assert data["plans"][0]["stages"][1]["state"] == "done"
    assert data["timeline"][0]["marks"][0]["seq"] == 2


def test_csv_sections_and_formula_injection_is_neutralised() -> None:
    evil = rec(10, 1500, "isolate", "ok", ["gw0"], reason="=HYPERLINK(\"http://x\")",
               detail={"results": results(["gw0"], "isolated")})
    text = to_csv(report([*drill(), evil]))
    sections = text.split("\n\r\n") if "\r\n" in text else text.split("\n\n")
    names = [s.strip().splitlines()[0] for s in sections if s.strip()]
    assert names == ["# report", "# time per gateway", "# exceptions", "# actions"]
    actions = list(csv.reader(io.StringIO(sections[3].strip())))
    assert actions[1][0] == "seq" and [row[0] for row in actions[2:]] == \
        [str(i) for i in range(1, 11)]
    assert actions[-1][6] == "'=HYPERLINK(\"http://x\")"


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(html: str) -> _Collect:
    p = _Collect()
    p.feed(html)
    return p


def test_html_is_self_contained_and_has_every_action() -> None:
    r = report()
    doc = parse(to_html(make_env(), r))
    text = " ".join(doc.text)
    for a in r.actions:
        assert f"#{a.seq}" in text and a.reason in text
    refs = [v for _, attrs in doc.tags for k, v in attrs.items()
            if k in ("href", "src", "xlink:href", "action") and v]
    assert refs and all(v.startswith("#seq-") for v in refs), refs  # offline: only anchors
    ids = {attrs.get("id") for _, attrs in doc.tags}
    assert all(v[1:] in ids for v in refs)  # every timeline link lands on its row
    assert not any(tag in ("script", "link", "img", "iframe") for tag, _ in doc.tags)
    assert "ab" * 32 in text and "none" in text  # head hash, no checkpoint


def test_html_and_svg_escape_hostile_text() -> None:
    html = to_html(make_env(), report(hostile_records()))
    doc = parse(html)
    assert not any(tag == "script" for tag, _ in doc.tags)
    assert not any("onload" in attrs for _, attrs in doc.tags)
    assert sum(tag == "svg" for tag, _ in doc.tags) == 1  # the timeline only
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&#34;&gt;&lt;svg onload=alert(2)&gt;" in html
    assert "\u202e" not in html and "all clear [U+202E]evil" in html
    svg = html[html.index("<svg"):html.index("</svg>")]
    assert "<title>#10 isolate ok by alice: &lt;script&gt;" in svg  # escaped in SVG too


def test_checkpoint_is_shown_when_there_is_one() -> None:
    cp = Checkpoint(seq=7, hash="cd" * 32, at=T0 + 100, where="offsite")
    assert "cd" * 32 in to_html(make_env(), report(checkpoint=cp))


@pytest.mark.skipif(shutil.which("pdftotext") is None, reason="pdftotext (poppler-utils)")
def test_pdf_has_every_action_and_the_head(tmp_path: Path) -> None:
    r = report([*drill(), *hostile_records()])
    path = tmp_path / filename(r, "pdf")
    path.write_bytes(to_pdf(make_env(), r))
    text = subprocess.run(["pdftotext", "-raw", str(path), "-"], capture_output=True,
                          text=True, check=True).stdout
    flat = " ".join(text.split())
    for a in r.actions:
        assert f"#{a.seq}" in flat
        assert " ".join(visible(a.reason).split()) in flat, a.reason
    assert "ab" * 32 in flat.replace(" ", "")
    assert "chain verified" in flat and "last checkpoint: none" in flat


def test_text_filters() -> None:
    assert visible("a\u202eb\u200bc") == "a[U+202E]b[U+200B]c"
    assert duration(3725) == "1h 02m 05s" and duration(45) == "45s"
    assert duration(2 * 86400 + 3600) == "2d 01h 00m"
