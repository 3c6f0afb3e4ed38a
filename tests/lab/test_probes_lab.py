"""Probes with real packets in the namespace lab: every flow of the table in docs/design.md
before, during and after isolation (IPv4 and IPv6); TCP SYN telling open, closed and
filtered apart; and a change whose probes disagree reported unverified, by name, in
`status --json`, `probe --json` and the metrics."""

from __future__ import annotations

import json
import select
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from drawbridge_lab import Lab
from drawbridge_lab.agentconf import agent_toml
from drawbridge_lab.topology import Gateway
from tests.lab.agent_rig import EXPECT, STATE_INDEX, AgentRig, Flow, flow_matrix, wait_for

pytestmark = pytest.mark.lab

PY = sys.executable
AGENT = str(Path(sys.executable).with_name("drawbridge-agent"))
METRICS_PORT = 9630
FETCH = ("import sys, urllib.request; "
         "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())")


# -- running the probe engine inside namespaces ---------------------------------------------


def probe_in(lab: Lab, ns: str, targets: list[str], timeout: float = 0.5
             ) -> dict[str, dict[str, Any]]:
    """`python -m agent.probes` in `ns`: {TYPE:TARGET: {outcome, detail, duration}}."""
    proc = lab.run(ns, [PY, "-m", "agent.probes", "--json", "--timeout", str(timeout),
                        *targets], timeout=60)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return {row.pop("probe"): row for row in rows}


def probes_for(flow: Flow) -> list[str]:
    """The probe kinds that test one flow of the matrix."""
    target = f"[{flow.addr}]:{flow.port}" if ":" in flow.addr else f"{flow.addr}:{flow.port}"
    if flow.kind == "tcp":
        return [f"tcp:{target}", f"tcp-syn:{target}"]
    if flow.kind == "udp":
        return [f"dns:{target}"]  # the echo service answers a DNS query with itself
    return [f"icmp:{flow.addr}"]


class ProbeWorkers:
    """One `python -m agent.probes --serve` per namespace, started once: a sweep then
    costs its probes' time, not a Python and scapy start-up per namespace."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, namespaces: Iterable[str]) -> None:
        new = [ns for ns in dict.fromkeys(namespaces) if ns not in self.procs]
        for ns in new:
            self.procs[ns] = self.lab.popen(ns, [PY, "-m", "agent.probes", "--serve"],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        for ns in new:
            assert json.loads(self._readline(ns, 60)) == {"ready": True}

    def _readline(self, ns: str, timeout: float) -> bytes:
        proc = self.procs[ns]
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        assert ready, f"probe worker in {ns} did not answer within {timeout}s"
        line = proc.stdout.readline()
        assert line, f"probe worker in {ns} exited"
        return line

    def send(self, ns: str, targets: list[str], timeout: float) -> None:
        proc = self.procs[ns]
        assert proc.stdin is not None
        proc.stdin.write(json.dumps({"targets": targets, "timeout": timeout}).encode() + b"\n")
        proc.stdin.flush()

    def receive(self, ns: str) -> dict[str, Any]:
        reply: dict[str, Any] = json.loads(self._readline(ns, 60))
        assert "error" not in reply, reply
        return reply

    def sweep(self, ns: str, targets: list[str], timeout: float = 0.5) -> dict[str, Any]:
        self.start([ns])
        self.send(ns, targets, timeout)
        return self.receive(ns)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in self.procs.values():
            proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.fixture
def workers(lab: Lab) -> Iterator[ProbeWorkers]:
    pool = ProbeWorkers(lab)
    yield pool
    pool.close()


def probe_flows(workers: ProbeWorkers, flows: Iterable[Flow]
                ) -> dict[tuple[Flow, str], dict[str, Any]]:
    """Every flow probed from its source namespace; all namespaces at the same time."""
    wanted: dict[str, dict[str, Flow]] = {}
    for f in flows:
        for p in probes_for(f):
            wanted.setdefault(f.src_ns, {})[p] = f
    workers.start(wanted)
    for ns, probes in wanted.items():
        workers.send(ns, list(probes), 0.5)
    out: dict[tuple[Flow, str], dict[str, Any]] = {}
    for ns, probes in wanted.items():
        for row in workers.receive(ns)["results"]:
            out[(probes[row["probe"]], row["probe"])] = row
    return out


def mismatches(results: dict[tuple[Flow, str], dict[str, Any]], state: str) -> list[str]:
    index = STATE_INDEX[state]
    out = []
    for (flow, probe), found in results.items():
        want = "reachable" if EXPECT[flow.row][index] else "unreachable"
        if found["outcome"] != want:
            out.append(f"{flow.row} {probe}: expected {want}, got {found['outcome']} "
                       f"({found['detail']})")
    return sorted(out)


def test_probes_agree_with_every_flow_of_the_design_table(rig: AgentRig,
                                                         workers: ProbeWorkers) -> None:
    flows = flow_matrix(rig.lab, rig.gw)
    assert {f.addr for f in flows if ":" in f.addr}, "IPv6 flows are part of the matrix"
    assert mismatches(probe_flows(workers, flows), "open") == []
    for profile in ("internet", "full"):
        rig.cli("isolate", "--profile", profile, "--reason", "precaution")
        results = probe_flows(workers, flows)
        assert mismatches(results, profile) == []
        # the gateway's own raw and UDP packets out are refused by its output chain at
        # once (EPERM); a TCP connect retries its SYN silently, so it times out
        details = {p: r["detail"] for (f, p), r in results.items()
                   if f.row == "gateway->outside" and not p.startswith("tcp:")}
        assert set(details.values()) == {"blocked-locally"}, details
    rig.cli("restore", "--reason", "all clear")
    assert mismatches(probe_flows(workers, flows), "open") == []


@pytest.fixture
def outside_firewall(lab: Lab) -> Iterator[None]:
    """On the outside host (a lab namespace): tcp/8443 silently dropped, tcp/8444 rejected
    with ICMP admin-prohibited. Both are 'filtered' for a SYN probe."""
    rules = """
table inet probe_lab {
  chain input {
    type filter hook input priority 0; policy accept;
    tcp dport 8443 drop
    tcp dport 8444 reject with icmpx admin-prohibited
  }
}
"""
    lab.run(lab.outside_ns, ["nft", "-f", "-"], input=rules)
    yield
    lab.run(lab.outside_ns, ["nft", "delete", "table", "inet", "probe_lab"], check=False)


@pytest.mark.usefixtures("outside_firewall")
def test_tcp_syn_tells_open_closed_and_filtered_apart(lab: Lab) -> None:
    gw = lab.gateways[0]
    targets = []
    for addr in (lab.outside_addr4, f"[{lab.outside_addr6}]"):
        targets += [f"tcp-syn:{addr}:443", f"tcp-syn:{addr}:9", f"tcp-syn:{addr}:8443",
                    f"tcp-syn:{addr}:8444"]
    found = probe_in(lab, gw.ns, targets, timeout=0.6)
    for addr in (lab.outside_addr4, f"[{lab.outside_addr6}]"):
        assert (found[f"tcp-syn:{addr}:443"]["outcome"],
                found[f"tcp-syn:{addr}:443"]["detail"]) == ("reachable", "open")
        assert (found[f"tcp-syn:{addr}:9"]["outcome"],
                found[f"tcp-syn:{addr}:9"]["detail"]) == ("reachable", "closed")
        silent = found[f"tcp-syn:{addr}:8443"]
        assert (silent["outcome"], silent["detail"]) == ("unreachable", "filtered")
        assert silent["duration_seconds"] >= 0.59  # no answer: waited for the timeout
        rejected = found[f"tcp-syn:{addr}:8444"]
        assert rejected["outcome"] == "unreachable"
        assert rejected["detail"].startswith("filtered (icmp ")
        assert rejected["duration_seconds"] < 0.3  # the ICMP error ended the wait early
        for port in (443, 9):
            assert found[f"tcp-syn:{addr}:{port}"]["duration_seconds"] < 0.3


@pytest.mark.usefixtures("outside_firewall")
def test_a_silent_target_never_holds_up_the_others(lab: Lab, workers: ProbeWorkers) -> None:
    gw = lab.gateways[0]
    silent = [f"tcp-syn:{lab.outside_addr4}:8443", f"tcp:{lab.outside_addr4}:8443",
              f"tcp:[{lab.outside_addr6}]:8443", f"tcp-syn:[{lab.outside_addr6}]:8443",
              "icmp:192.0.2.1", "dns:192.0.2.1"]
    answered = [f"tcp:{lab.outside_addr4}:443", f"icmp:{lab.outside_addr6}",
                f"dns:{lab.outside_addr4}", f"tcp-syn:[{lab.outside_addr6}]:80"]
    reply = workers.sweep(gw.ns, silent + answered, timeout=1.0)
    found = {row["probe"]: row for row in reply["results"]}
    for target in answered:
        assert found[target]["outcome"] == "reachable", (target, found[target])
        assert found[target]["duration_seconds"] < 0.3, (target, found[target])
    for target in silent:
        assert found[target]["outcome"] == "unreachable", (target, found[target])
    # six silent probes of 1 s each, one after another, would take 6 s
    assert reply["seconds"] < 1.5, reply["seconds"]


# -- the agent with probes: verified / unverified ---------------------------------------------


@dataclass
class ProbedAgent:
    """A lab gateway whose agent has probes and serves metrics on its mgmt address."""

    lab: Lab
    gw: Gateway
    workdir: Path
    daemon: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / "agent.toml"

    def write_config(self, probes: list[dict[str, Any]], *, probe_interval: float = 1.0) -> None:
        lab, gw = self.lab, self.gw
        out4, out6 = lab.outside_addr4, lab.outside_addr6
        lines = [
            agent_toml(lab, gw, self.workdir / "state", reconcile_interval=0.5,
                       mgmt_ports=(22, METRICS_PORT), metrics_listen=f"[::]:{METRICS_PORT}",
                       probe_interval=probe_interval),
            "[profiles.leaky]",
            f'allow = [{{ cidr = "{out4}/32", proto = "tcp", ports = [443], direction = "out" }},'
            f' {{ cidr = "{out6}/128", proto = "tcp", ports = [443], direction = "out" }}]',
        ]
        for p in probes:
            lines += ["[[probes]]", *(f"{k} = {json.dumps(v)}" for k, v in p.items()
                                      if k != "expect")]
            expect = ", ".join(f'{k} = "{v}"' for k, v in p.get("expect", {}).items())
            lines.append(f"expect = {{ {expect} }}")
        self.config_path.write_text("\n".join(lines) + "\n")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.lab.run(self.gw.ns, [AGENT, "-c", str(self.config_path), *args],
                            check=False, timeout=60)

    def json(self, *args: str) -> dict[str, Any]:
        out = self.cli(*args, "--json")
        assert out.stdout, out.stderr
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    def start(self) -> None:
        log = open(self.workdir / "agent.log", "ab")  # noqa: SIM115
        self.daemon = self.lab.popen(self.gw.ns, [AGENT, "-c", str(self.config_path), "run"],
                                     stdout=log, stderr=log)
        log.close()
        wait_for(lambda: (self.workdir / "state" / "agent.sock").exists(), 30, "agent socket")
        wait_for(lambda: self.scrape() is not None, 30, "metrics endpoint")

    def stop(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.terminate()
            self.daemon.wait(10)
        self.daemon = None

    def scrape(self, addr: str | None = None) -> str | None:
        """GET /metrics from the management host, as Prometheus would."""
        addr = addr or self.gw.mgmt_addr4
        host = f"[{addr}]" if ":" in addr else addr
        out = self.lab.run(self.lab.mgmt_ns, [PY, "-I", "-S", "-c", FETCH,
                                              f"http://{host}:{METRICS_PORT}/metrics"],
                           check=False, timeout=20)
        return out.stdout if out.returncode == 0 else None

    def metric(self, line_prefix: str) -> float:
        text = self.scrape()
        assert text is not None
        for line in text.splitlines():
            if line.startswith(line_prefix + " "):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{line_prefix} not in the scrape")

    def log(self) -> str:
        path = self.workdir / "agent.log"
        return path.read_text() if path.exists() else ""


@pytest.fixture
def probed(lab: Lab, tmp_path: Path) -> Iterator[ProbedAgent]:
    agent = ProbedAgent(lab, lab.gateways[0], tmp_path)
    yield agent
    agent.stop()


def outside_probes(lab: Lab) -> list[dict[str, Any]]:
    cut = {"open": "reachable", "isolated": "unreachable"}
    return [
        {"name": "outside-web", "type": "tcp", "target": f"{lab.outside_addr4}:443",
         "timeout": 0.5, "expect": cut},
        {"name": "outside-web6", "type": "tcp-syn", "target": f"[{lab.outside_addr6}]:443",
         "timeout": 0.5, "expect": cut},
        {"name": "outside-ping", "type": "icmp", "target": lab.outside_addr4,
         "timeout": 0.5, "expect": cut},
        {"name": "outside-dns6", "type": "dns", "target": lab.outside_addr6,
         "timeout": 0.5, "expect": cut},
        {"name": "internal-host", "type": "tcp-syn",
         "target": f"{lab.gateways[0].internal_host4}:80", "timeout": 0.5,
         "expect": {"open": "reachable", "isolated": "any"}},
    ]


def test_leaky_profile_is_unverified_by_name_in_status_probe_and_metrics(
        probed: ProbedAgent) -> None:
    probed.write_config(outside_probes(probed.lab))
    # break-glass, no daemon: the CLI verifies on its own
    change = probed.cli("isolate", "--profile", "leaky", "--reason", "casefiles first", "--json")
    assert change.returncode == 6, change.stdout + change.stderr  # applied, not verified
    result = json.loads(change.stdout)
    assert result["in_sync"] is True
    assert result["verification"]["failing"] == ["outside-web", "outside-web6"]
    status = probed.json("status")
    assert status["verification"]["status"] == "unverified"
    assert status["verification"]["failing"] == ["outside-web", "outside-web6"]
    assert any(d.startswith("outside-web: expected unreachable, got reachable (connected)")
               for d in status["verification"]["detail"])

    probed.start()  # now through the daemon, with metrics
    report = probed.json("probe")
    by_name = {p["name"]: p for p in report["probes"]}
    assert report["state"] == "isolated" and report["failing"] == ["outside-web",
                                                                    "outside-web6"]
    assert (by_name["outside-web6"]["outcome"], by_name["outside-web6"]["detail"]) == \
        ("reachable", "open")
    assert by_name["outside-ping"]["outcome"] == "unreachable" and by_name["outside-ping"]["ok"]
    assert by_name["internal-host"]["expected"] == "any" and by_name["internal-host"]["ok"]

    wait_for(lambda: probed.metric('drawbridge_probe_success{probe="outside-web"}') == 0, 10,
             "outside-web failing in metrics")
    assert probed.metric("drawbridge_isolated") == 1
    assert probed.metric("drawbridge_isolation_verified") == 0
    assert probed.metric('drawbridge_isolation_state{state="isolated_unverified"}') == 1
    assert probed.metric('drawbridge_profile_info{profile="leaky"}') == 1
    assert probed.metric('drawbridge_probe_success{probe="outside-web6"}') == 0
    assert probed.metric('drawbridge_probe_success{probe="outside-ping"}') == 1
    assert probed.metric('drawbridge_probe_reachable{probe="outside-web"}') == 1

    # the internet profile closes the leak: verified, everywhere
    change = probed.cli("isolate", "--profile", "internet", "--reason", "close it", "--json")
    assert change.returncode == 0, change.stdout + change.stderr
    assert json.loads(change.stdout)["verification"] == {
        **json.loads(change.stdout)["verification"], "status": "verified", "failing": []}
    assert probed.json("status")["verification"]["status"] == "verified"
    assert probed.metric('drawbridge_isolation_state{state="isolated"}') == 1
    assert probed.metric('drawbridge_probe_success{probe="outside-web"}') == 1
    assert probed.metric("drawbridge_apply_duration_seconds_count") >= 1
    # the scrape works over IPv6 management too, while isolated
    assert probed.scrape(probed.gw.mgmt_addr6) is not None

    change = probed.cli("restore", "--reason", "all clear", "--json")
    assert change.returncode == 0, change.stdout + change.stderr
    assert probed.metric('drawbridge_isolation_state{state="open"}') == 1


def test_sweeps_record_verdict_changes_and_drift_repairs(probed: ProbedAgent) -> None:
    """Open and verified; then the outside web service becomes unreachable for reasons
    of its own (a firewall over there): the next sweep marks the open state unverified,
    and verified again once it is back. A flushed chain is drift: repaired, counted."""
    lab = probed.lab
    probed.write_config(outside_probes(lab)[:2], probe_interval=0.5)
    probed.start()
    wait_for(lambda: probed.metric('drawbridge_isolation_state{state="open"}') == 1, 10,
             "open and verified")
    lab.run(lab.outside_ns, ["nft", "-f", "-"], input=(
        "table inet probe_lab {\n chain input {\n type filter hook input priority 0; "
        "policy accept;\n tcp dport 443 drop\n }\n}\n"))
    wait_for(lambda: probed.json("status")["verification"]["failing"]
             == ["outside-web", "outside-web6"], 10, "the sweep to notice")
    assert probed.metric('drawbridge_isolation_state{state="open_unverified"}') == 1
    journal = probed.json("journal")
    assert journal[-1]["action"] == "verify" and journal[-1]["result"] == "unverified"
    lab.run(lab.outside_ns, ["nft", "delete", "table", "inet", "probe_lab"])
    wait_for(lambda: probed.json("status")["verification"]["status"] == "verified", 10,
             "verified again")

    change = probed.cli("isolate", "--reason", "precaution", "--json")
    assert change.returncode == 0, change.stdout + change.stderr
    lab.run(probed.gw.ns, ["nft", "flush", "chain", "inet", "drawbridge", "output"])
    wait_for(lambda: probed.metric("drawbridge_drift_repairs_total") >= 1, 10, "drift repair")
    assert probed.metric("drawbridge_isolation_in_sync") == 1
    assert probed.json("status")["verification"]["status"] == "verified"
    assert "drift repaired" in probed.log()
