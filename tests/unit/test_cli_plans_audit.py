"""`drawbridge plan ...`, `restore --plan` and `drawbridge audit ...` against a real HTTP
server (in-memory agents): exit codes, --json, the two-person rule, checkpoint files,
reconcile."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from controller.audit import record_hash
from controller.auth import Role
from tests.storage import raw_sql
from tests.unit import test_controller_cli
from tests.unit.test_controller_cli import run

served = test_controller_cli.served  # the fixture: a controller behind a real HTTP server

PLAN = """
name = "back"
[[stages]]
name = "case files"
profile = "casefiles"
probes = ["outside-web"]
[[stages]]
name = "rest"
restore = true
gate = "approval"
"""


def as_json(code_out: tuple[int, str]) -> tuple[int, Any]:
    code, out = code_out
    return code, json.loads(out)


def test_plan_commands_and_the_two_person_rule(served, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ctl, fleet, url, tokens = served
    bob = ctl.create_token(user="bob", role=Role.admin, created_by="t", reason="t")
    run(url, tokens["operator"], "isolate", "--all", "--reason", "x")
    path = tmp_path / "plan.toml"
    path.write_text(PLAN)
    code, out = run(url, tokens["admin"], "restore", "--all", "--plan", str(path),
                    "--reason", "step by step")
    assert code == 7, out  # waits for a person
    assert "awaiting approval" in out and "plan approve" in out
    code, plans = as_json(run(url, tokens["viewer"], "plan", "status", "--json"))
    plan_id = plans[0]["plan_id"]
    code, plan = as_json(run(url, tokens["viewer"], "plan", "status", plan_id, "--json"))
    assert code == 7 and [s["state"] for s in plan["stages"]] == ["done", "awaiting approval"]
    code, out = run(url, tokens["admin"], "plan", "approve", plan_id, "--reason", "mine")
    assert code == 3 and "two-person" in out
    code, out = run(url, tokens["operator"], "plan", "pause", plan_id, "--reason", "x")
    assert code == 3
    code, plan = as_json(run(url, bob, "plan", "approve", plan_id, "--reason", "checked",
                             "--follow", "--json"))
    assert code == 0 and plan["state"] == "done", plan
    assert plan["stages"][1]["approved_by"] == "bob"
    assert all(a.state == "open" for a in fleet.agents.values())
    code, out = run(url, tokens["admin"], "plan", "abort", plan_id, "--reason", "late")
    assert code == 2 and "done" in out
    code, out = run(url, tokens["viewer"], "plan", "status", "nope")
    assert code == 2 and "no restore plan" in out


def test_plan_start_pause_resume_abort(served, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _ctl, fleet, url, tokens = served
    run(url, tokens["operator"], "isolate", "gw0", "gw1", "--profile", "full", "--reason", "x")
    path = tmp_path / "plan.toml"
    path.write_text('[[stages]]\nname = "a"\nprofile = "casefiles"\npause = "1h"\n')
    code, plan = as_json(run(url, tokens["admin"], "plan", "start", str(path), "gw0", "gw1",
                             "--reason", "later", "--json"))
    assert code == 0 and plan["targets"] == ["gw0", "gw1"]
    pid = plan["plan_id"]
    code, plan = as_json(run(url, tokens["admin"], "plan", "pause", pid, "--reason", "hold",
                             "--json"))
    assert plan["state"] == "paused" and plan["stages"][0]["state"] == "paused"
    code, _ = as_json(run(url, tokens["viewer"], "plan", "status", pid, "--json"))
    assert code == 7
    code, plan = as_json(run(url, tokens["admin"], "plan", "resume", pid, "--reason", "go",
                             "--json"))
    assert plan["state"] == "running" and "pause" in (plan["waiting"] or "")
    code, plan = as_json(run(url, tokens["admin"], "plan", "abort", pid, "--reason", "no",
                             "--follow", "--json"))
    assert code == 1 and plan["state"] == "aborted"
    assert fleet.agents["gw0"].profile == "full"  # untouched: nothing to send


def test_checkpoint_export_and_verify_with_the_file(served, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ctl, _fleet, url, tokens = served
    run(url, tokens["operator"], "isolate", "--all", "--reason", "x")
    ctl.checkpoints.wait()
    out_file = tmp_path / "cp.json"
    code, out = run(url, tokens["viewer"], "audit", "checkpoint", "export", "-o",
                    str(out_file))
    assert code == 0 and "wrote 1 checkpoint" in out
    data = json.loads(out_file.read_text())
    assert set(data["checkpoints"][0]) == {"seq", "head_hash", "time", "signature", "key_id"}
    assert len(data["checkpoints"][0]["head_hash"]) == 64 and data["public_key"]
    code, out = run(url, tokens["viewer"], "audit", "verify", "--checkpoint", str(out_file))
    assert code == 0 and "holds" in out, out
    code, out = run(url, tokens["operator"], "audit", "checkpoint", "create")
    assert code == 3
    run(url, tokens["operator"], "probe", "--all")
    code, made = as_json(run(url, tokens["admin"], "audit", "checkpoint", "create", "--json"))
    assert code == 0 and made["anchored"] == {"gw0": "recorded", "gw1": "recorded",
                                              "gw2": "recorded"}
    # rewrite record 2 with the chain key, and everything after it
    db, key = ctl.config.db_url, ctl.audit.key
    rows = raw_sql(db, "SELECT seq, ts_us, actor, action, outcome, targets, reason, ticket, "
                       "command_id, detail FROM audit_log ORDER BY seq")
    prev = "0" * 64
    for seq, ts, actor, action, outcome, targets, reason, ticket, cid, detail in rows:
        reason = "edited" if seq == 2 else reason
        prev = record_hash(key, seq=seq, ts_us=ts, actor=actor, action=action,
                           outcome=outcome, targets=targets, reason=reason, ticket=ticket,
                           command_id=cid, detail=detail, prev_hash=prev) if seq >= 2 \
            else raw_sql(db, "SELECT hash FROM audit_log WHERE seq = 1")[0][0]
        raw_sql(db, "UPDATE audit_log SET reason = :r, hash = :h WHERE seq = :s", r=reason,
                h=prev, s=seq)
    code, report = as_json(run(url, tokens["viewer"], "audit", "verify", "--checkpoint",
                               str(out_file), "--json"))
    assert code == 1 and not report["ok"]
    assert any(c["source"] == str(out_file) and not c["ok"] for c in report["checkpoints"])
    code, out = run(url, tokens["admin"], "audit", "acknowledge", "--reason", "x")
    assert code in (0, 2)  # whether an append has seen the damage yet


def test_reconcile_exit_codes(served) -> None:  # type: ignore[no-untyped-def]
    _ctl, fleet, url, tokens = served
    run(url, tokens["operator"], "isolate", "--all", "--reason", "x")
    code, report = as_json(run(url, tokens["viewer"], "audit", "reconcile", "--json"))
    assert code == 0 and report["ok"], report
    fleet.agents["gw2"].local_change("full")
    code, out = run(url, tokens["viewer"], "audit", "reconcile")
    assert code == 1 and "unordered" in out and "gw2" in out
    code, report = as_json(run(url, tokens["viewer"], "audit", "reconcile", "--gateway", "gw0",
                               "--since", "1h", "--json"))
    assert code == 0 and [g["gateway"] for g in report["gateways"]] == ["gw0"]
    code, out = run(url, tokens["viewer"], "audit", "reconcile", "--gateway", "nope")
    assert code == 2
