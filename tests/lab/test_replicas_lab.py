"""Two controller replicas on one real PostgreSQL, three real gateways: either replica
takes any command, a SIGKILLed replica's gateways are taken over within the bound and
keep taking commands, the audit chain verifies, and every command reaches each
agent's journal exactly once under the controller's command id, including one that
the killed replica had accepted and not finished.
"""

from __future__ import annotations

import secrets
import subprocess
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from drawbridge_lab import Lab
from drawbridge_lab.fleet import CLI, FleetRig, GatewayRig, wait_for
from drawbridge_lab.postgres import PostgresServer
from drawbridge_lab.replicas import ReplicaRig, journal_request_ids

pytestmark = pytest.mark.lab
N = 3
TAKEOVER_BOUND = 10.0  # seconds from SIGKILL to every gateway held by the survivor


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory,
             postgres_server: PostgresServer) -> Iterator[ReplicaRig]:
    name = f"lab_{secrets.token_hex(4)}"
    url = postgres_server.create_database(name)
    try:
        with Lab.create(gateways=N) as lab:
            fleet = FleetRig(lab, tmp_path_factory.mktemp("replicas"), probes=True)
            rig = ReplicaRig(lab, fleet.workdir / "replicas", url, count=2, fleet=fleet)
            try:
                fleet.start()
                rig.write_configs(poll_interval=1.0)
                rig.make_tokens()
                rig.start_all()
                rig.add_gateways(0)
                wait_for(lambda: balanced(rig), 20, "both replicas to hold gateways")
                yield rig
            finally:
                rig.stop_all()
                fleet.stop()
    finally:
        postgres_server.drop_database(name)


def balanced(rig: ReplicaRig) -> bool:
    owners = rig.owners()
    counts = Counter(owners.values())
    return len(owners) == N and None not in counts and len(counts) == 2


def gateway(rig: ReplicaRig, name: str) -> GatewayRig:
    assert rig.fleet is not None
    return next(g for g in rig.fleet.gateways if g.gw.name == name)


def logs(rig: ReplicaRig) -> str:
    return "\n".join(f"--- {r.replica_id}\n{r.log_text()[-2500:]}" for r in rig.replicas)


def applied_once(rig: ReplicaRig) -> None:
    """No command applied twice: each request id at most once in each agent's journal."""
    assert rig.fleet is not None
    for g in rig.fleet.gateways:
        ids = Counter(journal_request_ids(g.state_dir))
        twice = {i: n for i, n in ids.items() if n > 1}
        assert not twice, f"{g.gw.name} applied a request more than once: {twice}"


def test_isolate_through_either_replica_then_failover(replicas: ReplicaRig) -> None:
    rig = replicas
    res = rig.cli_json(1, "isolate", "--all", "--reason", "drill via b")
    assert res["ok"] and sorted(r["outcome"] for r in res["results"]) == ["verified"] * N
    first = res["command_id"]
    res = rig.cli_json(0, "restore", "--all", "--reason", "back via a")
    assert res["ok"], res
    second = res["command_id"]
    res = rig.cli_json(0, "isolate", "--all", "--reason", "again via a")
    assert res["ok"], res
    third = res["command_id"]
    assert rig.fleet is not None
    for g in rig.fleet.gateways:  # every command once in every journal, under its id
        assert journal_request_ids(g.state_dir)[-3:] == [first, second, third]

    owners = rig.owners()
    victim = 0 if list(owners.values()).count("replica-a") else 1
    survivor = 1 - victim
    theirs = rig.held_by(rig.replicas[victim].replica_id)
    assert theirs
    rig.kill(victim)
    t0 = time.monotonic()
    res = rig.cli_json(survivor, "restore", *theirs, "--reason", "after the kill", timeout=60)
    restored = time.monotonic() - t0
    assert res["ok"] and [r["gateway"] for r in res["results"]] == theirs, res
    wait_for(lambda: set(rig.held_by(rig.replicas[survivor].replica_id)) >= set(theirs),
             TAKEOVER_BOUND, "the survivor to hold the killed replica's gateways")
    assert restored < TAKEOVER_BOUND + 5, f"restore took {restored:.1f}s\n{logs(rig)}"
    for name in theirs:
        assert journal_request_ids(gateway(rig, name).state_dir)[-1] == res["command_id"]
    verify = rig.cli_json(survivor, "audit", "verify")
    assert verify["ok"], verify
    subprocess.run([*rig_server(rig, survivor), "audit", "verify"], check=True,
                   capture_output=True, timeout=60)
    applied_once(rig)

    # the killed replica comes back under its replica id and gets its share again
    rig.start(victim)
    wait_for(lambda: balanced(rig), 20, "the leases to spread again")
    res = rig.cli_json(victim, "restore", "--all", "--reason", "all clear")
    assert res["ok"], res
    applied_once(rig)


def rig_server(rig: ReplicaRig, i: int) -> list[str]:
    from drawbridge_lab.fleet import CONTROLLER
    return [CONTROLLER, "-c", str(rig.replicas[i].config)]


def test_a_command_accepted_by_the_killed_replica_is_completed_once_by_the_survivor(
        replicas: ReplicaRig) -> None:
    rig = replicas
    victim = 0
    wait_for(lambda: bool(rig.held_by(rig.replicas[victim].replica_id)), 20,
             "replica a to hold a gateway")
    name = rig.held_by(rig.replicas[victim].replica_id)[0]
    g = gateway(rig, name)
    before = set(journal_request_ids(g.state_dir))
    # the gateway's management link is down: the request leaves replica a and never
    # arrives, so that a has accepted the command, claimed it and not finished it
    assert rig.fleet is not None
    rig.fleet.cut_mgmt_link(g)
    env = [f"DRAWBRIDGE_URL={rig.replicas[victim].url}",
           f"DRAWBRIDGE_TOKEN={rig.tokens['admin']}"]
    client = rig.lab.popen(rig.lab.mgmt_ns, ["env", *env, CLI, "isolate", name, "--profile",
                                             "full", "--reason", "last words", "--json"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: bool(rig.query(
            "SELECT 1 FROM commands WHERE accepted_by = :r AND gateway = :g AND "
            "reason = 'last words' AND state = 'claimed'",
            r=rig.replicas[victim].replica_id, g=name)), 10, "replica a to claim it")
        rig.kill(victim)
    finally:
        client.wait(30)
    rig.fleet.cut_mgmt_link(g, up=True)
    [row] = rig.query("SELECT command_id FROM commands WHERE reason = 'last words'")
    command_id = row.command_id
    t0 = time.monotonic()
    wait_for(lambda: bool(rig.query("SELECT 1 FROM commands WHERE command_id = :c AND "
                                    "state = 'done'", c=command_id)), 30,
             "the survivor to carry it out")
    done = time.monotonic() - t0
    [row] = rig.query("SELECT claimed_by, attempts, result FROM commands WHERE "
                      "command_id = :c", c=command_id)
    assert row.claimed_by == rig.replicas[1].replica_id and row.attempts == 2, row
    assert '"outcome": "verified"' in row.result or '"outcome":"verified"' in row.result, row
    assert done < TAKEOVER_BOUND + 10, logs(rig)
    ids = journal_request_ids(g.state_dir)
    assert [i for i in ids if i not in before] == [command_id]  # once, under its own id
    status = {v["name"]: v for v in rig.cli_json(1, "status", role="viewer")}
    assert status[name]["state"] == "isolated" and status[name]["profile"] == "full"
    # its outcome is recorded by the survivor (the replica that accepted it is gone)
    wait_for(lambda: bool(rig.query("SELECT 1 FROM audit_log WHERE command_id = :c AND "
                                    "outcome = 'ok'", c=command_id)), 15,
             "the survivor to record the orphaned command's outcome")
    [rec] = rig.query("SELECT detail FROM audit_log WHERE command_id = :c AND outcome = 'ok'",
                      c=command_id)
    assert '"recorded_by":"replica-b"' in rec.detail, rec.detail
    assert rig.cli_json(1, "audit", "verify")["ok"]
    applied_once(rig)
    rig.start(victim)
    res = rig.cli_json(1, "restore", "--all", "--reason", "all clear")
    assert res["ok"], res
