"""The controller end to end in the namespace lab: real agents, real sshd, real nftables,
the real `drawbridge-controller serve` and the real `drawbridge` CLI, real packets.

One five-gateway fleet serves the whole module, once per store (SQLite, and a
PostgreSQL server this test run starts); every test leaves it as it found it (all
gateways open, every sshd up with its own host key).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drawbridge_lab import Lab
from drawbridge_lab.fleet import (
    AGENT,
    API_URL,
    OUTSIDE_PORT,
    FleetRig,
    GatewayRig,
    fingerprint,
    keygen,
    wait_for,
)
from tests.storage import raw_sql

pytestmark = pytest.mark.lab
N = 5


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Iterator[FleetRig]:
    with Lab.create(gateways=N) as lab:
        rig = FleetRig(lab, tmp_path_factory.mktemp("fleet"), probes=True)
        try:
            rig.start()
            rig.write_controller_config(poll_interval=1.0, database_url=database_url)
            rig.make_tokens()
            rig.start_controller()
            rig.add_gateways()
            yield rig
        finally:
            rig.stop()


def outside_reachable(rig: FleetRig, gws: list[GatewayRig] | None = None) -> list[bool]:
    lab = rig.lab
    return lab.check_many([("tcp", g.gw.internal_ns, lab.outside_addr4, OUTSIDE_PORT)
                           for g in gws or rig.gateways], timeout=1.0)


def status_by_name(rig: FleetRig) -> dict[str, dict[str, Any]]:
    proc = rig.cli("status", "--json", role="viewer")
    return {v["name"]: v for v in json.loads(proc.stdout)}


def command(rig: FleetRig, *args: str, role: str = "admin",
            expect: int = 0) -> dict[str, Any]:
    proc = rig.cli(*args, "--json", role=role)
    assert proc.returncode == expect, f"{args}: exit {proc.returncode}\n{proc.stdout}\n" \
                                      f"{proc.stderr}\n{rig.controller_log()[-2000:]}"
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def journal_lines(rig: GatewayRig) -> int:
    path = rig.state_dir / "journal.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


# -- the drill ------------------------------------------------------------------------------


def test_isolate_all_then_restore_with_proof_and_history(fleet: FleetRig) -> None:
    assert all(outside_reachable(fleet))
    result = command(fleet, "isolate", "--all", "--reason", "CSIRT warning: NetScaler",
                     "--ticket", "INC-2025-0723", role="operator")
    assert [r["gateway"] for r in result["results"]] == [f"gw{i}" for i in range(N)]
    for r in result["results"]:
        assert (r["outcome"], r["state"], r["verification"], r["in_sync"]) == \
            ("verified", "isolated", "verified", True), r
    assert not any(outside_reachable(fleet)), "an inside host still reaches the outside"

    probe = command(fleet, "probe", "gw0", role="operator")  # evidence on demand
    assert probe["results"][0]["outcome"] == "verified"
    assert probe["results"][0]["result"]["probes"][0]["name"] == "outside-web"
    # an exception for a chain partner's service (not the port the probe watches: opening
    # that one would, rightly, make the isolation unverified)
    allowed = command(fleet, "allow", "gw0", "--cidr", f"{fleet.lab.outside_addr4}/32",
                      "--proto", "tcp", "--port", "8443", "--direction", "out",
                      "--for", "1h", "--reason", "chain partner", role="operator")
    assert allowed["results"][0]["outcome"] == "verified"
    lab = fleet.lab
    assert lab.check_many([("tcp", g.gw.internal_ns, lab.outside_addr4, port)
                           for g in fleet.gateways[:2] for port in (8443, OUTSIDE_PORT)]) == \
        [True, False, False, False]  # only gw0's inside hosts, only that flow

    result = command(fleet, "restore", "--all", "--reason", "all clear from the CSIRT")
    assert all((r["outcome"], r["state"]) == ("verified", "open") for r in result["results"])
    assert all(outside_reachable(fleet)), "an inside host did not get the outside back"

    records = fleet.cli_json("history", role="viewer")
    done = [(r["action"], r["actor"], r["reason"], r["ticket"]) for r in records
            if r["outcome"] == "ok" and r["action"] in ("isolate", "restore")]
    assert done == [("isolate", "operator-lab", "CSIRT warning: NetScaler", "INC-2025-0723"),
                    ("restore", "admin-lab", "all clear from the CSIRT", None)]
    isolate = next(r for r in records if r["action"] == "isolate" and r["outcome"] == "ok")
    assert sorted(r["gateway"] for r in isolate["detail"]["results"]) == \
        [f"gw{i}" for i in range(N)]
    evidence = isolate["detail"]["results"][0]["evidence"]  # the probe result, kept
    assert evidence["status"] == "verified"
    only_gw3 = fleet.cli_json("history", "--gateway", "gw3", "--action", "isolate",
                              role="viewer")
    assert {r["outcome"] for r in only_gw3} == {"requested", "ok"}
    csv_out = fleet.cli("history", "--action", "restore", "--csv", role="viewer").stdout
    assert csv_out.splitlines()[0].startswith("seq,time,actor,action")
    assert "all clear from the CSIRT" in csv_out
    # the gateways themselves know who did it and why
    states = status_by_name(fleet)
    assert all(v["state"] == "open" and v["actor"] == "admin-lab" for v in states.values())
    gw_journal = (fleet.gateways[0].state_dir / "journal.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in gw_journal]
    entry = [e for e in entries if e["action"] == "isolate"][-1]
    assert (entry["actor"], entry["reason"], entry["ticket"]) == \
        ("operator-lab", "CSIRT warning: NetScaler", "INC-2025-0723")


def test_unreachable_gateway_is_reported_and_retried_when_back(fleet: FleetRig) -> None:
    down = fleet.gateways[2]
    fleet.stop_sshd(down)
    result = command(fleet, "isolate", "--all", "--reason", "precaution", role="operator",
                     expect=1)
    by_gw = {r["gateway"]: r for r in result["results"]}
    bad = by_gw.pop(down.gw.name)
    assert bad["outcome"] == "unreachable" and bad["will_retry"]
    assert "refused" in bad["message"] or "no answer" in bad["message"], bad
    assert all(r["outcome"] == "verified" for r in by_gw.values())
    reach = dict(zip([g.gw.name for g in fleet.gateways], outside_reachable(fleet),
                     strict=True))
    assert reach.pop(down.gw.name) is True  # not isolated (yet)
    assert not any(reach.values())
    assert status_by_name(fleet)[down.gw.name]["pending"]["action"] == "isolate"

    fleet.start_sshd(down)  # it comes back: the controller delivers the isolation
    wait_for(lambda: (lambda v: v["state"] == "isolated" and v["pending"] is None)(
        status_by_name(fleet)[down.gw.name]), 30, f"{down.gw.name} isolated by the retry")
    assert outside_reachable(fleet, [down]) == [False]
    retries = [r for r in fleet.cli_json("history", "--gateway", down.gw.name, "--action",
                                         "isolate", role="viewer")
               if r["detail"].get("retry_of") and r["outcome"] == "ok"]
    assert retries and retries[0]["actor"] == "operator-lab"
    command(fleet, "restore", "--all", "--reason", "drill over")
    assert all(outside_reachable(fleet))


def test_changed_host_key_is_refused_audited_and_nothing_is_sent(fleet: FleetRig) -> None:
    victim = fleet.gateways[4]
    real_key = victim.host_key
    fleet.stop_sshd(victim)
    impostor = keygen(victim.dir / "impostor_host_key", "impostor")
    victim.host_key = impostor
    fleet.start_sshd(victim)
    try:
        before = journal_lines(victim)
        result = command(fleet, "isolate", victim.gw.name, "--reason", "test", role="operator",
                         expect=1)
        r = result["results"][0]
        assert (r["outcome"], r["error_code"], r["will_retry"]) == \
            ("refused", "host_key_mismatch", False)
        assert fingerprint(impostor.with_suffix(".pub")) in r["message"]
        assert fingerprint(real_key.with_suffix(".pub")) in r["message"]
        wait_for(lambda: bool(fleet.cli_json("history", "--action", "hostkey",
                                             role="viewer")), 10, "the audit record")
        refusals = fleet.cli_json("history", "--action", "hostkey", role="viewer")
        assert refusals[0]["targets"] == [victim.gw.name]
        assert refusals[0]["detail"]["presented"] == fingerprint(impostor.with_suffix(".pub"))
        assert journal_lines(victim) == before  # the agent never heard of it
        sshd_log = (victim.dir / "sshd" / "sshd.log").read_text()
        assert "Accepted publickey" not in sshd_log.split("Server listening")[-1]
        assert outside_reachable(fleet, [victim]) == [True]
        assert len(fleet.cli_json("history", "--action", "hostkey", role="viewer")) == 1
    finally:
        fleet.stop_sshd(victim)
        victim.host_key = real_key
        fleet.start_sshd(victim)
    wait_for(lambda: status_by_name(fleet)[victim.gw.name]["reachable"] is True, 20,
             "the real gateway to be reachable again")


def test_tokens_no_token_401_viewer_403_and_refusals_audited(fleet: FleetRig) -> None:
    proc = fleet.cli("isolate", "--all", "--reason", "x", role=None)
    assert proc.returncode == 3 and "no API token" in proc.stderr
    proc = fleet.cli("isolate", "--all", "--reason", "x", role="viewer")
    assert proc.returncode == 3 and "isolating gateways needs the operator role" in proc.stderr
    proc = fleet.cli("restore", "--all", "--reason", "x", role="operator")
    assert proc.returncode == 3 and "restoring gateways needs the admin role" in proc.stderr
    refused = fleet.cli_json("history", "--action", "auth.refused", role="viewer")
    assert [(r["actor"], r["detail"]["request"]) for r in refused[-3:]] == [
        ("anonymous", "POST /v1/isolate"), ("viewer-lab", "POST /v1/isolate"),
        ("operator-lab", "POST /v1/restore")]
    assert all(v["state"] == "open" for v in status_by_name(fleet).values())


def ssh(fleet: FleetRig, gw: GatewayRig, *extra: str, stdin: str | None = None,
        key: Path | None = None) -> Any:
    return fleet.lab.run(fleet.lab.mgmt_ns, [
        "ssh", "-i", str(key or fleet.key), "-o", "BatchMode=yes", "-o",
        "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o",
        "LogLevel=ERROR", "-o", "ConnectTimeout=5", *extra, f"root@{gw.gw.mgmt_addr4}",
    ], check=False, input=stdin, timeout=30)


def test_restricted_key_cannot_open_a_shell_or_run_another_command(fleet: FleetRig,
                                                                 tmp_path: Path) -> None:
    gw = fleet.gateways[0]
    marker = tmp_path / "pwned"
    proc = ssh(fleet, gw, f"touch {marker}; id", stdin="")
    assert not marker.exists() and "uid=" not in proc.stdout
    proc = ssh(fleet, gw, "-tt", stdin="id\nexit\n")  # an interactive shell
    assert "uid=" not in proc.stdout
    assert all(line.startswith("{") for line in proc.stdout.replace("\r", "").splitlines()
               if line.strip()), proc.stdout  # whatever it typed went to the agent as JSON
    proc = ssh(fleet, gw, "-W", f"{fleet.lab.outside_addr4}:{OUTSIDE_PORT}", stdin="")
    assert proc.returncode != 0  # no forwarding through the gateway
    proc = ssh(fleet, gw, "-N", "-o", "ExitOnForwardFailure=yes", "-R", "127.0.0.1:2222:x:22",
               stdin="")
    assert proc.returncode != 0
    proc = ssh(fleet, gw, stdin='{"v":1,"id":"a","op":"ping"}\nid\n')
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[0]["ok"] and lines[0]["result"]["gateway"] == gw.gw.name
    assert lines[1]["error"]["code"] == "bad_json"


def test_malformed_and_oversize_input_is_refused_and_changes_nothing(fleet: FleetRig) -> None:
    gw = fleet.gateways[1]
    before = json.loads((gw.state_dir / "state.json").read_text())
    lines = "\n".join([
        "{not json",
        '{"v":1,"id":"big","op":"ping","args":{"x":"' + "x" * 70_000 + '"}}',
        '{"v":1,"id":"noreason","op":"isolate","args":{"profile":"internet"}}',
        '{"v":1,"id":"evil","op":"isolate","args":{"profile":"internet","reason":"a\\nb"}}',
        '{"v":1,"id":"bogus","op":"rm_rf","args":{}}',
        '{"v":9,"id":"v9","op":"ping"}',
        '{"v":1,"id":"st","op":"status"}',
    ]) + "\n"
    proc = ssh(fleet, gw, stdin=lines)
    answers = [json.loads(line) for line in proc.stdout.splitlines()]
    codes = [a["error"]["code"] if not a["ok"] else "ok" for a in answers]
    assert codes == ["bad_json", "too_large", "bad_request", "bad_request", "bad_request",
                     "unsupported_version", "ok"]
    assert answers[-1]["result"]["state"] == "open"
    after = json.loads((gw.state_dir / "state.json").read_text())
    assert after["generation"] == before["generation"]

    post = (
        "import json,sys,urllib.request,urllib.error\n"
        "def post(body, ctype='application/json'):\n"
        f"    req = urllib.request.Request('{API_URL}/v1/isolate', data=body, method='POST',\n"
        "        headers={'Content-Type': ctype, 'Authorization': 'Bearer ' + sys.argv[1]})\n"
        "    try:\n"
        "        with urllib.request.urlopen(req, timeout=10) as r: return r.status, r.read()\n"
        "    except urllib.error.HTTPError as e: return e.code, e.read()\n"
        "out = [post(b'{\"targets\": {\"all\": tru'),\n"
        "       post(json.dumps({'targets': {'all': True}, 'reason': 'x' * 100000}).encode()),\n"
        "       post(json.dumps({'targets': {'all': True}, 'reason': 'r', 'profile': ';drop'})"
        ".encode())]\n"
        "print(json.dumps([[s, json.loads(b)] for s, b in out]))\n"
    )
    proc = fleet.lab.run(fleet.lab.mgmt_ns, [sys.executable, "-c", post,
                                             fleet.tokens["operator"]], check=False)
    results = json.loads(proc.stdout)
    assert [s for s, _ in results] == [422, 413, 422], proc.stdout + proc.stderr
    assert "JSON" in results[0][1]["error"]["message"]
    assert "exceeds" in results[1][1]["error"]["message"]
    assert "not a valid name" in results[2][1]["error"]["message"]
    assert all(v["state"] == "open" for v in status_by_name(fleet).values())
    assert all(outside_reachable(fleet))


def test_tampering_with_the_audit_log_is_detected_and_named(fleet: FleetRig) -> None:
    def verify() -> tuple[int, str]:
        proc = fleet.cli("audit", "verify", role="viewer")
        return proc.returncode, proc.stdout + proc.stderr

    def sql(statement: str, **params: object) -> Any:
        return raw_sql(fleet.db_url, statement, **params)

    assert verify()[0] == 0
    (seq, reason), = sql("SELECT seq, reason FROM audit_log WHERE action='isolate' AND "
                         "outcome='ok' ORDER BY seq LIMIT 1")
    sql("UPDATE audit_log SET reason = 'routine maintenance' WHERE seq = :seq", seq=seq)
    code, out = verify()
    assert code == 1 and f"#{seq}" in out and "altered" in out, out
    sql("UPDATE audit_log SET reason = :reason WHERE seq = :seq", reason=reason, seq=seq)
    assert verify()[0] == 0

    row = sql("SELECT * FROM audit_log WHERE seq = :seq", seq=seq)[0]._asdict()
    sql("DELETE FROM audit_log WHERE seq = :seq", seq=seq)
    code, out = verify()
    assert code == 1 and f"#{seq}" in out and "missing" in out, out
    sql(f"INSERT INTO audit_log ({', '.join(row)}) VALUES "
        f"({', '.join(':' + k for k in row)})", **row)
    assert verify()[0] == 0

    swap = ((seq, -1), (seq + 1, seq), (-1, seq + 1))  # swap two records
    for a, b in swap:
        sql("UPDATE audit_log SET seq = :b WHERE seq = :a", a=a, b=b)
    code, out = verify()
    assert code == 1 and f"#{seq}" in out, out
    for a, b in swap:
        sql("UPDATE audit_log SET seq = :b WHERE seq = :a", a=a, b=b)
    assert verify()[0] == 0


def test_break_glass_and_drift_become_state_history(fleet: FleetRig) -> None:
    gw = fleet.gateways[3]
    seen = len(fleet.cli_json("history", "--action", "state", role="viewer"))
    proc = fleet.lab.run(gw.gw.ns, [AGENT, "-c", str(gw.config), "isolate", "--profile",
                                    "full", "--reason", "console break-glass", "--actor",
                                    "root@console"], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    def events() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = fleet.cli_json("history", "--action", "state",
                                                     role="viewer")[seen:]
        return found

    wait_for(lambda: any(e["action"] == "state.changed" for e in events()), 20,
             "the poller to notice the local change")
    changed = next(e for e in events() if e["action"] == "state.changed")
    assert changed["targets"] == [gw.gw.name] and changed["actor"] == "controller"
    assert "root@console" in changed["reason"] and "console break-glass" in changed["reason"]
    assert status_by_name(fleet)[gw.gw.name]["profile"] == "full"

    fleet.lab.run(gw.gw.ns, ["nft", "flush", "ruleset"])  # someone wipes the firewall
    wait_for(lambda: any(e["action"] == "state.drift_repaired" for e in events()), 30,
             "the agent's repair to show up in the controller's history")
    assert outside_reachable(fleet, [gw]) == [False]
    command(fleet, "restore", gw.gw.name, "--reason", "break-glass over")
    assert outside_reachable(fleet, [gw]) == [True]


def test_controller_restart_keeps_inventory_history_and_states(fleet: FleetRig) -> None:
    command(fleet, "isolate", "gw1", "--profile", "full", "--reason", "before restart",
            role="operator")
    keys = ("name", "address", "user", "key_path", "host_key", "groups", "trust_on_first_use")

    def inventory() -> list[dict[str, Any]]:
        return [{k: g[k] for k in keys} for g in fleet.cli_json("gateway", "list",
                                                                role="viewer")]

    before = inventory()
    history = fleet.cli_json("history", "--limit", "100000", role="viewer")
    fleet.stop_controller()
    fleet.start_controller()
    assert inventory() == before and len(before) == N
    assert fleet.cli_json("history", "--limit", "100000", role="viewer")[:len(history)] == \
        history
    states = status_by_name(fleet)
    assert (states["gw1"]["state"], states["gw1"]["profile"]) == ("isolated", "full")
    assert all(states[f"gw{i}"]["state"] == "open" for i in (0, 2, 3, 4))
    proc = fleet.cli("audit", "verify", role="viewer")
    assert proc.returncode == 0, proc.stdout
    command(fleet, "restore", "gw1", "--reason", "after restart")
    assert all(outside_reachable(fleet))


def test_exceptions_through_the_controller_governed_and_exact(fleet: FleetRig) -> None:
    lab, gw0 = fleet.lab, fleet.gateways[0]
    command(fleet, "isolate", "gw0", "gw1", "--profile", "full", "--reason", "precaution",
            role="operator")
    partner = f"{lab.outside_addr4}/32"

    def reaches_8443() -> list[bool]:
        return lab.check_many([("tcp", g.gw.internal_ns, lab.outside_addr4, 8443)
                               for g in fleet.gateways[:2]])

    # refused, with a clear error and nothing sent: the whole internet, by anyone; wider
    # than the operator limit, by an operator
    before = journal_lines(gw0)
    for cidr, role, code, fragment in (("0.0.0.0/0", "admin", 2, "whole internet"),
                                       ("198.51.0.0/16", "operator", 3, "needs an admin")):
        proc = fleet.cli("allow", "gw0", "--cidr", cidr, "--proto", "tcp", "--port", "8443",
                         "--for", "1h", "--reason", "too wide", role=role)
        assert proc.returncode == code and fragment in proc.stderr, proc.stderr
    assert journal_lines(gw0) == before

    opened = command(fleet, "allow", "gw0", "--cidr", partner, "--proto", "tcp", "--port",
                     "8443", "--for", "1h", "--reason", "chain partner", role="operator")
    assert opened["results"][0]["outcome"] == "verified"
    assert reaches_8443() == [True, False]  # only gw0, only out
    assert not lab.tcp_ok(lab.outside_ns, gw0.gw.internal_host4, 80)

    listed = command(fleet, "allow", "list", "gw0", role="viewer")
    [exc] = listed[0]["result"]["exceptions"]
    assert exc["flow"]["direction"] == "out" and exc["actor"] == "operator-lab"
    command(fleet, "allow", "extend", "gw0", exc["id"], "--for", "4h",
            "--reason", "the hearing moved", role="operator")
    [longer] = command(fleet, "allow", "list", "gw0", role="viewer")[0]["result"]["exceptions"]
    assert longer["remaining_seconds"] > 3 * 3600
    assert reaches_8443() == [True, False]
    command(fleet, "allow", "revoke", "gw0", exc["id"], "--reason", "done", role="operator")
    assert reaches_8443() == [False, False]
    assert command(fleet, "allow", "list", "gw0", role="viewer")[0]["result"]["exceptions"] \
        == []
    records = fleet.cli_json("history", "--gateway", "gw0", role="viewer")
    assert [r["action"] for r in records if r["outcome"] == "ok"
            and r["action"] in ("allow", "extend", "revoke")][-3:] == \
        ["allow", "extend", "revoke"]
    command(fleet, "restore", "gw0", "gw1", "--reason", "drill over")
