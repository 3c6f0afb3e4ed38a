"""Dead peers are found in seconds, and commands never wait behind polls: the real
controller, agents and sshd's in the namespace lab (once per store).

Three gateways, agents without probes (verified = read back), as in the latency
benchmark. gw0's forced command answers `status` 3 s late (drawbridge_lab.slowrpc):
every poll of it is slow, for real, through sshd and the agent. gw2's management
link is pulled (its interface set down inside its namespace) after the controller
connected; the request timeout stays at 120 s, so only the keepalive liveness can
find it within the documented bound.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from controller.config import SshSettings
from drawbridge_lab import Lab
from drawbridge_lab.fleet import FleetRig, GatewayRig, wait_for

pytestmark = pytest.mark.lab
STATUS_DELAY = 3.0
DEAD_AFTER = SshSettings().dead_after  # the documented default bound: 8 s
assert DEAD_AFTER is not None

STREAM = r"""
import http.client, json, sys, time
token, body = sys.argv[1], sys.argv[2]
conn = http.client.HTTPConnection("127.0.0.1", 8630, timeout=300)
conn.request("GET", "/v1/whoami", headers={"Authorization": "Bearer " + token})
conn.getresponse().read()  # a warm connection, as the CLI's would be
t0 = time.monotonic()
conn.request("POST", "/v1/isolate", body=body, headers={
    "Authorization": "Bearer " + token, "Content-Type": "application/json",
    "Accept": "application/x-ndjson"})
events = []
for line in conn.getresponse():
    if line.strip():
        event = json.loads(line)
        event["t"] = time.monotonic() - t0
        events.append(event)
print(json.dumps(events))
"""

DURING_POLL = r"""
import http.client, json, sys, time
token, gw, log, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
conn = http.client.HTTPConnection("127.0.0.1", 8630, timeout=60)
headers = {"Authorization": "Bearer " + token, "Content-Type": "application/json"}

def statuses():
    out = []
    for line in open(log).read().splitlines():
        kind, ts = line.split()
        if kind == "start":
            out.append([float(ts), None])
        elif out:
            out[-1][1] = float(ts)
    return out

def isolate(profile):
    body = json.dumps({"targets": {"gateways": [gw]}, "profile": profile,
                       "reason": "isolate during a slow poll"})
    t = time.perf_counter()
    conn.request("POST", "/v1/isolate", body=body, headers=headers)
    resp = conn.getresponse()
    data = json.loads(resp.read())
    return time.perf_counter() - t, resp.status, data

isolate("internet")  # warm-up: the agent compiles the profile once
rounds_out = []
for i in range(rounds):
    deadline = time.monotonic() + 30
    while True:  # wait until a status of this gateway is in flight
        st = statuses()
        if st and st[-1][1] is None and time.time() - st[-1][0] < 2.0:
            break
        if time.monotonic() > deadline:
            raise SystemExit("no poll in flight within 30 s")
        time.sleep(0.01)
    began = time.time()
    latency, code, data = isolate("full" if i % 2 == 0 else "internet")
    ended = time.time()
    poll = next(s for s in statuses() if s[0] <= began and (s[1] is None or s[1] >= began))
    rounds_out.append({"latency": latency, "code": code,
                       "outcome": data["results"][0]["outcome"],
                       "poll_in_flight_until_answer": poll[1] is None or poll[1] >= ended})
print(json.dumps(rounds_out))
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Iterator[FleetRig]:
    with Lab.create(gateways=3) as lab:
        rig = FleetRig(lab, tmp_path_factory.mktemp("liveness"), probes=False)
        rig.gateways[0].status_delay = STATUS_DELAY
        try:
            rig.start()
            rig.write_controller_config(poll_interval=1.0, database_url=database_url)
            rig.make_tokens()
            rig.start_controller()
            rig.add_gateways()
            wait_for(lambda: all(v["reachable"] for v in status_by_name(rig).values()), 60,
                     "the controller to connect to every gateway")
            yield rig
        finally:
            rig.stop()


def status_by_name(rig: FleetRig) -> dict[str, dict[str, Any]]:
    proc = rig.cli("status", "--json", role="viewer")
    return {v["name"]: v for v in json.loads(proc.stdout)} if proc.returncode == 0 else {}


def stream_isolate(rig: FleetRig, body: dict[str, Any]) -> list[dict[str, Any]]:
    proc = rig.lab.run(rig.lab.mgmt_ns, [sys.executable, "-c", STREAM,
                                         rig.tokens["operator"], json.dumps(body)],
                       timeout=300)
    events: list[dict[str, Any]] = json.loads(proc.stdout)
    return events


def restore_all(rig: FleetRig) -> None:
    proc = rig.cli("restore", "--all", "--reason", "test over", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr + rig.controller_log()[-3000:]


def test_a_cut_link_is_unreachable_within_the_bound_and_catches_up(fleet: FleetRig) -> None:
    dead: GatewayRig = fleet.gateways[2]
    name = dead.gw.name
    fleet.cut_mgmt_link(dead)
    try:
        events = stream_isolate(fleet, {"targets": {"all": True}, "profile": "internet",
                                        "reason": "link cut drill"})
    finally:
        fleet.cut_mgmt_link(dead, up=True)
    results = {e["result"]["gateway"]: (e["t"], e["result"]) for e in events
               if e["event"] == "result"}
    done = next(e for e in events if e["event"] == "done")
    t_dead, res_dead = results.pop(name)
    print(f"\nunreachable after {t_dead:.2f}s (bound {DEAD_AFTER:g}s); others: "
          + ", ".join(f"{g} {t:.2f}s" for g, (t, _) in sorted(results.items())))
    assert res_dead["outcome"] == "unreachable" and res_dead["will_retry"], res_dead
    assert "stopped answering" in res_dead["message"], res_dead
    assert t_dead <= DEAD_AFTER + 1.5, f"found dead after {t_dead:.1f}s"
    for g, (t, res) in results.items():  # never held up by the dead one
        assert res["outcome"] == "verified", res
        assert t < min(3.0, t_dead), f"{g} answered after {t:.2f}s"
    assert done["t"] <= DEAD_AFTER + 2.0
    # the link is back: the pending isolation is delivered by the next polls
    wait_for(lambda: (lambda v: v.get("state") == "isolated" and v.get("pending") is None)(
        status_by_name(fleet).get(name, {})), 60, f"{name} to catch up")
    # Either the poll sent it again (a retry, recorded once its fan-out returns, just
    # after the state), or TCP got the first request through when the link came back
    # and the poll found it applied. Each is recorded under the command's id.
    command_id = done["result"]["command_id"]

    def recorded() -> bool:
        history = fleet.cli_json("history", "--gateway", name, role="viewer")
        return any(r["command_id"] == command_id and r["detail"].get("retry_of")
                   and r["outcome"] == "ok" for r in history) or \
            any(r["action"] == "state.pending_delivered"
                and r["detail"].get("command_id") == command_id for r in history)

    wait_for(recorded, 15, f"the record of {name}'s delivered isolation")
    restore_all(fleet)


def test_isolate_during_a_slow_poll_does_not_wait_for_it(fleet: FleetRig) -> None:
    slow = fleet.gateways[0]
    proc = fleet.lab.run(fleet.lab.mgmt_ns, [
        sys.executable, "-c", DURING_POLL, fleet.tokens["operator"], slow.gw.name,
        str(slow.status_log), "8"], timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr + fleet.controller_log()[-3000:]
    rounds = json.loads(proc.stdout)
    latencies = [r["latency"] for r in rounds]
    print(f"\nisolate during a {STATUS_DELAY:g}s poll: median "
          f"{statistics.median(latencies) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms")
    assert all(r["code"] == 200 and r["outcome"] == "verified" for r in rounds), rounds
    assert all(r["poll_in_flight_until_answer"] for r in rounds), rounds
    # None waited for its poll (which holds the gateway for STATUS_DELAY). How fast an
    # isolate is (the goal: < 100 ms warm) is measured by the benchmarks, not asserted
    # here: on a loaded 2-core CI machine a timer would fail for reasons of its own.
    assert max(latencies) < STATUS_DELAY / 3, latencies
    restore_all(fleet)
