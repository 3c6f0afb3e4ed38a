"""`drawbridge report` against a real HTTP server; the plan-stage metric of the controller."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from controller.plans import parse_plan
from controller.schemas import Targets
from tests.unit.test_controller_cli import run, served  # noqa: F401 (a fixture)
from tests.unit.test_controller_support import (
    ADMIN,
    OPERATOR,
    FakeFleet,
    make_controller,
    settle,
)


def test_report_command(served, tmp_path: Path,  # type: ignore[no-untyped-def]  # noqa: F811
                        monkeypatch: pytest.MonkeyPatch) -> None:
    _ctl, _fleet, url, tokens = served
    code, out = run(url, tokens["operator"], "isolate", "--all", "--reason", "CSIRT warning")
    assert code == 0, out
    code, out = run(url, tokens["viewer"], "report", "--since", "1h", "--format", "json")
    assert code == 0, out
    report = json.loads(out)
    assert {a["reason"] for a in report["actions"]} >= {"CSIRT warning"}
    assert all(isinstance(a["seq"], int) for a in report["actions"])
    pdf = tmp_path / "r.pdf"
    code, out = run(url, tokens["viewer"], "report", "--format", "pdf", "--output", str(pdf))
    assert code == 0 and pdf.read_bytes().startswith(b"%PDF") and "wrote" in out
    monkeypatch.setattr("controller.cli.stdout_is_terminal", lambda: True)
    code, out = run(url, tokens["viewer"], "report", "--format", "pdf")
    assert code == 2 and "--output" in out  # no binary on a terminal
    code, out = run(url, tokens["viewer"], "report", "--format", "html")
    assert code == 0 and out.startswith("<!DOCTYPE html>")
    code, out = run(url, tokens["viewer"], "report", "--format", "doc")
    assert code == 2
    code, out = run(url, None, "report")
    assert code == 3


def test_plan_stage_metric(tmp_path: Path, db_url: str) -> None:
    ctl = make_controller(tmp_path, FakeFleet(["gw0", "gw1"]), db_url=db_url)
    try:
        assert b"drawbridge_plan_stage_info" not in generate_latest(ctl.metrics.registry)
        ctl.isolate(OPERATOR, Targets(all=True), profile="full", reason="x", ticket=None)
        plan = parse_plan({"name": "back", "stages": [
            {"name": "case files", "profile": "casefiles"}, {"name": "rest", "restore": True}]})
        started = ctl.plans.start(ADMIN, Targets(all=True), plan, reason="reconnect",
                                  ticket=None)
        assert settle(ctl, started.plan_id).state == "done"
        text = generate_latest(ctl.metrics.registry).decode()
        stages = [line for line in text.splitlines()
                  if line.startswith("drawbridge_plan_stage_info{")]
        assert len(stages) == 2
        assert 'stage="case files"' in stages[0] and 'state="done"' in stages[0]
        assert 'index="2"' in stages[1] and 'plan="back"' in stages[1]
        assert 'drawbridge_plan_stages{plan_id=' in text
    finally:
        ctl.close()
