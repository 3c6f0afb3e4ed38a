"""Issue 9 items 1-3 end to end in the namespace lab: real agents, sshd, nftables, the real
controller (SIGKILLed and restarted) and the real CLI, real packets.

- a break-glass change made on a gateway's console shows up in `audit reconcile` as a
  change the controller never ordered; checkpoints reach the gateways' journals and
  prove the chain from an exported file;
- a three-stage restore plan with probe gates and one approval stage over three
  gateways: after each stage real traffic reaches exactly the flows opened so far; the
  admin who started it cannot approve it; the controller is killed mid-stage and
  restarted, the plan resumes and no stage runs twice (each gateway's journal holds
  each stage's request id once);
- `plan abort` returns every gateway to the state it had when the plan started.

One three-gateway fleet serves the module, once per store.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drawbridge_lab import Lab
from drawbridge_lab.fleet import (
    AGENT,
    CASEFILES_PORT,
    OUTSIDE_PORT,
    FleetRig,
    GatewayRig,
    wait_for,
)
from tests.storage import raw_sql

pytestmark = pytest.mark.lab
N = 3
PLANS_TOML = """
[plans]
interval_seconds = 1
probe_interval_seconds = 1
probe_timeout_seconds = 60
"""
PLAN = """
name = "reconnect after the incident"

[[stages]]
name = "case files"
profile = "casefiles"
probes = ["outside-web"]

[[stages]]
name = "offices first"
gateways = ["gw0", "gw1"]
restore = true
gate = "approval"
probes = ["outside-web"]

[[stages]]
name = "everything else"
restore = true
pause = "25s"
probes = ["outside-web"]
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Iterator[FleetRig]:
    with Lab.create(gateways=N) as lab:
        rig = FleetRig(lab, tmp_path_factory.mktemp("fleet"), probes=True)
        try:
            rig.start()
            rig.write_controller_config(poll_interval=1.0, database_url=database_url,
                                        extra_toml=PLANS_TOML)
            rig.make_tokens()
            rig.tokens["admin2"] = rig.server_cli("token", "create", "--user", "second-admin",
                                                  "--role", "admin")
            rig.start_controller()
            rig.add_gateways()
            yield rig
        finally:
            rig.stop()


def cli(rig: FleetRig, *args: str, role: str = "admin", expect: int | None = 0) -> Any:
    proc = rig.cli(*args, "--json", role=role)
    if expect is not None:
        assert proc.returncode == expect, f"{args}: exit {proc.returncode}\n{proc.stdout}\n" \
                                          f"{proc.stderr}\n{rig.controller_log()[-3000:]}"
    return json.loads(proc.stdout) if proc.stdout.strip() else None


def flows(rig: FleetRig) -> dict[str, tuple[bool, bool]]:
    """Per gateway: (its inside reaches the outside on 443, on the case-file port)."""
    lab = rig.lab
    got = lab.check_many([("tcp", g.gw.internal_ns, lab.outside_addr4, port)
                          for g in rig.gateways for port in (OUTSIDE_PORT, CASEFILES_PORT)],
                         timeout=1.0)
    return {g.gw.name: (got[2 * i], got[2 * i + 1]) for i, g in enumerate(rig.gateways)}


def journal(rig: GatewayRig) -> list[dict[str, Any]]:
    path = rig.state_dir / "journal.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plan_status(rig: FleetRig, plan_id: str) -> dict[str, Any]:
    result: dict[str, Any] = cli(rig, "plan", "status", plan_id, role="viewer", expect=None)
    return result


def wait_plan(rig: FleetRig, plan_id: str, cond: Any, what: str,
              timeout: float = 90) -> dict[str, Any]:
    wait_for(lambda: cond(plan_status(rig, plan_id)), timeout, what, step=0.5)
    return plan_status(rig, plan_id)


def isolate_all(rig: FleetRig, reason: str) -> None:
    cli(rig, "isolate", "--all", "--reason", reason, role="operator")
    assert flows(rig) == dict.fromkeys(("gw0", "gw1", "gw2"), (False, False))


def test_break_glass_on_a_console_is_a_change_nobody_ordered(fleet: FleetRig,
                                                              tmp_path: Path) -> None:
    gw = fleet.gateways[2]
    assert cli(fleet, "audit", "reconcile", role="viewer")["ok"]
    proc = fleet.lab.run(gw.gw.ns, [AGENT, "-c", str(gw.config), "isolate", "--profile",
                                    "full", "--reason", "console break-glass", "--actor",
                                    "root@console"], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = cli(fleet, "audit", "reconcile", role="viewer", expect=1)
    by_gw = {g["gateway"]: g for g in report["gateways"]}
    assert by_gw["gw0"]["ok"] and by_gw["gw1"]["ok"]
    [diff] = by_gw[gw.gw.name]["differences"]
    assert diff["kind"] == "unordered" and "root@console" in diff["message"]
    assert diff["command_id"].startswith("cli-")
    assert diff["journal"]["reason"] == "console break-glass"
    human = fleet.cli("audit", "reconcile", "--gateway", gw.gw.name, role="viewer")
    assert human.returncode == 1 and "never ordered" in human.stdout
    # the controller's own orders carry its command id and the requested record's hash
    after = time.time()
    result = cli(fleet, "restore", gw.gw.name, "--reason", "break-glass over")
    entry = [e for e in journal(gw) if e["action"] == "restore"][-1]
    assert entry["request_id"] == result["command_id"]
    [requested] = [r for r in cli(fleet, "history", "--gateway", gw.gw.name, role="viewer")
                   if r["command_id"] == result["command_id"] and r["outcome"] == "requested"]
    assert entry["audit"] == requested["hash"]
    assert cli(fleet, "audit", "reconcile", "--since", str(after), role="viewer")["ok"]
    # checkpoints (one followed the restore) reach every journal and prove the chain
    # from an exported file
    cli(fleet, "probe", "gw0", role="operator")
    made = cli(fleet, "audit", "checkpoint", "create")
    assert set(made["anchored"].values()) == {"recorded"}
    assert cli(fleet, "audit", "checkpoint", "create", expect=2) is None  # nothing new
    exported = tmp_path / "checkpoints.json"
    proc = fleet.cli("audit", "checkpoint", "export", "--output", str(exported),
                     role="viewer")
    assert proc.returncode == 0, proc.stderr
    seqs = [c["seq"] for c in json.loads(exported.read_text())["checkpoints"]]
    seq = made["checkpoint"]["seq"]
    assert seq == seqs[-1] and len(seqs) >= 2
    for rig in fleet.gateways:
        assert [e["seq"] for e in journal(rig) if e["action"] == "checkpoint"][-2:] == \
            seqs[-2:]
    verified = cli(fleet, "audit", "verify", "--checkpoint", str(exported), role="viewer")
    assert verified["ok"] and any(c["seq"] == seq and c["source"] == str(exported)
                                  for c in verified["checkpoints"])


def test_a_three_stage_plan_with_probes_and_an_approval_survives_a_killed_controller(
        fleet: FleetRig) -> None:
    isolate_all(fleet, "incident")
    plan_file = fleet.workdir / "plan.toml"
    plan_file.write_text(PLAN)
    started = cli(fleet, "plan", "start", str(plan_file), "--reason", "all clear, step by step",
                  "--ticket", "INC-7")
    pid = started["plan_id"]
    status = wait_plan(fleet, pid, lambda p: p["stages"][1]["state"] == "awaiting approval",
                       "stage 1 done, stage 2 awaiting approval")
    assert [s["state"] for s in status["stages"]] == ["done", "awaiting approval", "pending"]
    assert flows(fleet) == dict.fromkeys(("gw0", "gw1", "gw2"), (False, True))
    assert all(status["stages"][0]["probe_results"][g]["outside-web"] for g in
               ("gw0", "gw1", "gw2"))

    refused = fleet.cli("plan", "approve", pid, "--reason", "my own plan")
    assert refused.returncode == 3 and "two-person" in refused.stderr
    # gw1's management link goes down: stage 2 reaches gw0, gw1 holds it
    gw1 = fleet.gateways[1]
    fleet.cut_mgmt_link(gw1)
    try:
        cli(fleet, "plan", "approve", pid, "--reason", "case files checked", role="admin2")
        status = wait_plan(fleet, pid, lambda p: p["stages"][1]["results"].get("gw1") ==
                           "unreachable", "gw1 to hold stage 2", timeout=60)
        assert status["stages"][1]["state"] == "running"
        assert status["stages"][1]["results"]["gw0"] == "verified"
        assert "waits for gw1" in status["waiting"]
        assert flows(fleet) == {"gw0": (True, True), "gw1": (False, True),
                                "gw2": (False, True)}
        # the controller dies mid-stage (kill -9), the gateway comes back meanwhile
        fleet.kill_controller()
    finally:
        fleet.cut_mgmt_link(gw1, up=True)
    [(doc,)] = raw_sql(fleet.db_url, "SELECT doc FROM plans WHERE plan_id = :p", p=pid)
    at_kill = json.loads(doc)["stages"][1]
    assert at_kill["state"] == "sending" and at_kill["command_id"]
    fleet.start_controller()

    status = wait_plan(fleet, pid, lambda p: p["stages"][1]["state"] == "done",
                       "stage 2 done after the restart")
    assert status["stages"][1]["command_id"] == at_kill["command_id"]  # completed, not rerun
    assert status["stages"][2]["state"] == "pending"  # its pause holds it: observe now
    assert flows(fleet) == {"gw0": (True, True), "gw1": (True, True), "gw2": (False, True)}
    assert plan_status(fleet, pid)["stages"][2]["state"] == "pending"
    assert status["stages"][1]["approved_by"] == "second-admin"

    status = wait_plan(fleet, pid, lambda p: p["state"] == "done", "the plan done")
    assert flows(fleet) == dict.fromkeys(("gw0", "gw1", "gw2"), (True, True))
    assert [s["state"] for s in status["stages"]] == ["done", "done", "done"]
    for s in status["stages"]:
        for name in s["gateways"]:
            rig = next(g for g in fleet.gateways if g.gw.name == name)
            ids = [e.get("request_id") for e in journal(rig)]
            assert ids.count(s["command_id"]) == 1, (name, s["name"], s["command_id"])
    records = cli(fleet, "history", "--action", "restore", "--limit", "500", role="viewer")
    stage_records = [r for r in records if r["detail"].get("plan_id") == pid]
    assert {r["detail"].get("stage") for r in stage_records} >= {
        "case files", "offices first", "everything else"}
    assert any(r["action"] == "restore.plan.approve" and r["actor"] == "second-admin"
               for r in stage_records)
    # after the restart the stage was completed under its own command id, sent again to
    # the gateway that had not answered (only to it)
    resent = [r for r in stage_records if r["detail"].get("stage") == "offices first"
              and r["detail"].get("resend") and r["outcome"] == "requested"]
    assert resent and {r["command_id"] for r in resent} == {at_kill["command_id"]}
    assert all(r["targets"] == ["gw1"] for r in resent)
    assert cli(fleet, "audit", "verify", role="viewer")["ok"]


def test_abort_returns_the_gateways_to_where_the_plan_started(fleet: FleetRig) -> None:
    cli(fleet, "isolate", "gw0", "--reason", "precaution", role="operator")
    cli(fleet, "isolate", "gw1", "--profile", "full", "--reason", "compromised",
        role="operator")
    cli(fleet, "restore", "gw2", "--reason", "clean")
    before = {v["name"]: (v["state"], v["profile"])
              for v in cli(fleet, "status", role="viewer", expect=None)}
    assert before == {"gw0": ("isolated", "internet"), "gw1": ("isolated", "full"),
                      "gw2": ("open", None)}
    plan_file = fleet.workdir / "abort.toml"
    plan_file.write_text('[[stages]]\nname = "case files"\nprofile = "casefiles"\n'
                         'probes = ["outside-web"]\n\n[[stages]]\nname = "all"\n'
                         'restore = true\ngate = "approval"\n')
    pid = cli(fleet, "plan", "start", str(plan_file), "--reason", "try")["plan_id"]
    wait_plan(fleet, pid, lambda p: p["stages"][1]["state"] == "awaiting approval",
              "stage 1 done")
    assert flows(fleet) == dict.fromkeys(("gw0", "gw1", "gw2"), (False, True))
    aborted = cli(fleet, "plan", "abort", pid, "--reason", "new indicators", "--follow",
                  role="admin2", expect=1)
    assert aborted["state"] == "aborted"
    assert [s["state"] for s in aborted["stages"]] == ["done", "aborted"]
    after = {v["name"]: (v["state"], v["profile"])
             for v in cli(fleet, "status", role="viewer", expect=None)}
    assert after == before
    assert flows(fleet) == {"gw0": (False, False), "gw1": (False, False), "gw2": (True, True)}
    cli(fleet, "restore", "--all", "--reason", "drill over")
    assert flows(fleet) == dict.fromkeys(("gw0", "gw1", "gw2"), (True, True))
