"""The namespace lab itself: with no firewall anywhere, every flow of the design works.

These tests prove the lab before the agent tests rely on it: each flow of the
isolation table passes over TCP, UDP and ICMP, IPv4 and IPv6; the probes also
say False when traffic cannot pass; teardown leaves nothing behind.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from drawbridge_lab import Lab, cleanup_stale
from drawbridge_lab.addressing import MAX_GATEWAYS, gateway_addresses
from drawbridge_lab.netns import list_namespaces, namespace_pids
from drawbridge_lab.topology import PROBE, PY

pytestmark = pytest.mark.lab


# ------------------------------------------------------------------ address plan (pure)


def test_address_plan_is_consistent() -> None:
    seen: set[str] = set()
    for i in range(MAX_GATEWAYS):
        a = gateway_addresses(i)
        net4, net6 = (ipaddress.ip_network(n) for n in a.internal_networks)
        for host in (a.internal_host4, a.internal2_host4, a.inside_addr4, a.inside2_addr4):
            assert ipaddress.ip_address(host) in net4
        for host in (a.internal_host6, a.internal2_host6, a.inside_addr6, a.inside2_addr6):
            assert ipaddress.ip_address(host) in net6
        assert ipaddress.ip_address(a.outside_addr4) in ipaddress.ip_network("198.51.100.0/24")
        assert ipaddress.ip_address(a.outside_addr6) in ipaddress.ip_network("2001:db8:100::/64")
        assert ipaddress.ip_address(a.mgmt_addr4) in ipaddress.ip_network("10.99.0.0/24")
        assert ipaddress.ip_address(a.mgmt_addr6) in ipaddress.ip_network("fd99::/64")
        assert not net4.overlaps(ipaddress.ip_network("10.99.0.0/16"))
        own = {a.outside_addr4, a.outside_addr6, a.mgmt_addr4, a.mgmt_addr6, *a.internal_networks}
        assert not own & seen
        seen |= own
    assert gateway_addresses(0).internal_networks == ("10.20.0.0/16", "fd20::/48")
    with pytest.raises(ValueError):
        gateway_addresses(MAX_GATEWAYS)


# ------------------------------------------------------------------ the flow matrix

# (src role, dst role, tcp port, udp port); roles are resolved against a built lab.
FLOWS = {
    "internal->outside": ("int", "outside", 443, 53),
    "internal2->outside": ("int2", "outside", 80, 5353),
    "outside->internal": ("outside", "int", 80, 5353),
    "outside->internal2": ("outside", "int2", 80, 5353),
    "outside->gateway-vpn": ("outside", "gw-outside", 8443, 5353),
    "gateway->outside": ("gw", "outside", 443, 53),
    "internal->gateway": ("int", "gw-inside", 8443, 5353),
    "internal->gateway-outside-addr": ("int", "gw-outside", 8443, 5353),
    "internal2->gateway": ("int2", "gw-inside2", 8443, 5353),
    "internal->internal2": ("int", "int2", 80, 5353),
    "internal2->internal": ("int2", "int", 80, 5353),
    "mgmt->gateway": ("mgmt", "gw-mgmt", 8443, 5353),
}


def src_ns(lab: Lab, role: str, i: int = 0) -> str:
    gw = lab.gateways[i]
    return {
        "int": gw.internal_ns,
        "int2": gw.internal2_ns,
        "gw": gw.ns,
        "outside": lab.outside_ns,
        "mgmt": lab.mgmt_ns,
    }[role]


def dst_addr(lab: Lab, role: str, family: int, i: int = 0) -> str:
    gw = lab.gateways[i]
    v4 = family == 4
    return {
        "int": gw.internal_host4 if v4 else gw.internal_host6,
        "int2": gw.internal2_host4 if v4 else gw.internal2_host6,
        "gw-inside": gw.inside_addr4 if v4 else gw.inside_addr6,
        "gw-inside2": gw.inside2_addr4 if v4 else gw.inside2_addr6,
        "gw-outside": gw.outside_addr4 if v4 else gw.outside_addr6,
        "gw-mgmt": gw.mgmt_addr4 if v4 else gw.mgmt_addr6,
        "outside": lab.outside_addr4 if v4 else lab.outside_addr6,
    }[role]


def check_all(lab: Lab, src: str, dst: str, tcp: int, udp: int) -> dict[str, bool]:
    return {
        f"tcp/{tcp}": lab.tcp_ok(src, dst, tcp),
        f"udp/{udp}": lab.udp_ok(src, dst, udp),
        "icmp": lab.ping_ok(src, dst),
    }


@pytest.fixture(scope="module")
def shared_lab() -> Iterator[Lab]:
    """One lab for the read-only flow matrix (nothing in these tests changes it)."""
    with Lab.create(gateways=1) as built:
        yield built


@pytest.mark.parametrize("family", [4, 6], ids=["v4", "v6"])
@pytest.mark.parametrize("flow", list(FLOWS))
def test_flow_passes_without_firewall(shared_lab: Lab, flow: str, family: int) -> None:
    src_role, dst_role, tcp, udp = FLOWS[flow]
    src = src_ns(shared_lab, src_role)
    dst = dst_addr(shared_lab, dst_role, family)
    results = check_all(shared_lab, src, dst, tcp, udp)
    assert results == dict.fromkeys(results, True), f"{flow} {src} -> {dst}: {results}"


def test_internal_to_internal_is_routed_through_the_gateway(shared_lab: Lab) -> None:
    gw = shared_lab.gateways[0]
    for dst in (gw.internal2_host4, gw.internal2_host6):
        out = shared_lab.run(gw.internal_ns, ["ip", "route", "get", dst]).stdout
        assert "via" in out and (gw.inside_addr4 in out or gw.inside_addr6 in out), out
    # With the gateway's forwarding path dropped, int -> int2 stops (it really crosses gw).
    shared_lab.run(
        gw.ns,
        ["nft", "-f", "-"],
        input="table inet labtest { chain cut { type filter hook forward priority 0; "
        "policy drop; }; }",
    )
    try:
        assert not shared_lab.tcp_ok(gw.internal_ns, gw.internal2_host4, 80, timeout=0.5)
        assert not shared_lab.ping_ok(gw.internal_ns, gw.internal2_host6)
    finally:
        shared_lab.run(gw.ns, ["nft", "delete", "table", "inet", "labtest"])
    assert shared_lab.tcp_ok(gw.internal_ns, gw.internal2_host4, 80)


# ------------------------------------------------------------------ one fresh lab


def test_build_is_fast_and_attributes_match_the_kernel(lab: Lab) -> None:
    assert lab.build_seconds < 2.0, lab.build_seconds
    gw = lab.gateways[0]
    assert gw.ns == f"{lab.prefix}gw0" and lab.prefix.startswith(f"dbl-{os.getpid()}-")
    assert set(list_namespaces(lab.prefix)) == set(lab.namespaces)
    assert len(lab.namespaces) == 5
    assert gw.internal_networks == ("10.20.0.0/16", "fd20::/48")

    def addrs(ns: str) -> dict[str, set[str]]:
        data = json.loads(lab.run(ns, ["ip", "-j", "addr", "show"]).stdout)
        out: dict[str, set[str]] = {}
        for link in data:
            for a in link.get("addr_info", []):
                assert "tentative" not in a, (ns, link["ifname"], a)
                if a.get("scope") == "global":
                    out.setdefault(link["ifname"], set()).add(f"{a['local']}/{a['prefixlen']}")
        return out

    assert addrs(gw.ns) == {
        gw.inside_if: {f"{gw.inside_addr4}/24", f"{gw.inside_addr6}/64"},
        gw.inside2_if: {f"{gw.inside2_addr4}/24", f"{gw.inside2_addr6}/64"},
        gw.outside_if: {f"{gw.outside_addr4}/24", f"{gw.outside_addr6}/64"},
        gw.mgmt_if: {f"{gw.mgmt_addr4}/24", f"{gw.mgmt_addr6}/64"},
    }
    assert addrs(gw.internal_ns) == {"eth0": {f"{gw.internal_host4}/24", f"{gw.internal_host6}/64"}}
    assert addrs(gw.internal2_ns) == {
        "eth0": {f"{gw.internal2_host4}/24", f"{gw.internal2_host6}/64"}
    }
    assert addrs(lab.outside_ns) == {
        lab.outside_if: {f"{lab.outside_addr4}/24", f"{lab.outside_addr6}/64"}
    }
    assert addrs(lab.mgmt_ns) == {lab.mgmt_if: {f"{lab.mgmt_addr4}/24", f"{lab.mgmt_addr6}/64"}}
    sysctl = lab.run(
        gw.ns, ["sysctl", "-n", "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"]
    ).stdout.split()
    assert sysctl == ["1", "1"]
    # Nothing of ours in the root namespace: no link of that name appeared there.
    root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert lab.prefix not in root_links and " inside2" not in root_links


def test_probes_say_false_when_traffic_cannot_pass(lab: Lab) -> None:
    gw = lab.gateways[0]
    started = time.monotonic()
    assert not lab.tcp_ok(gw.internal_ns, lab.outside_addr4, 444)  # closed port: RST
    assert not lab.tcp_ok(gw.internal_ns, lab.outside_addr6, 444)
    assert not lab.udp_ok(gw.internal_ns, lab.outside_addr4, 5354)  # port unreachable
    assert not lab.udp_ok(gw.internal_ns, lab.outside_addr6, 5354)
    assert time.monotonic() - started < 2.0
    # Nobody owns this address: timeouts, bounded by ~1 s each.
    started = time.monotonic()
    assert not lab.tcp_ok(gw.internal_ns, "198.51.100.77", 80)
    assert not lab.ping_ok(gw.internal_ns, "2001:db8:100::77")
    assert time.monotonic() - started < 5.0


def test_established_stream_stops_carrying_data_when_cut(lab: Lab) -> None:
    gw = lab.gateways[0]
    with lab.open_stream(gw.internal_ns, lab.outside_addr6, 443) as stream:
        assert stream.connected
        assert stream.roundtrip() and stream.roundtrip()
        lab.run(
            gw.ns,
            ["nft", "-f", "-"],
            input="table inet labtest { chain cut { type filter hook forward priority 0; "
            "policy drop; }; }",
        )
        assert not stream.roundtrip(timeout=0.5)
        assert not lab.tcp_ok(gw.internal_ns, lab.outside_addr4, 443, timeout=0.5)
        lab.run(gw.ns, ["nft", "delete", "table", "inet", "labtest"])
        assert stream.roundtrip(timeout=3.0)  # retransmission gets through again
    assert not stream.roundtrip()  # closed


def test_open_stream_to_closed_port(lab: Lab) -> None:
    gw = lab.gateways[0]
    stream = lab.open_stream(gw.internal_ns, lab.outside_addr4, 444, check=False)
    assert not stream.connected and not stream.roundtrip()
    with pytest.raises(RuntimeError):
        lab.open_stream(gw.internal_ns, lab.outside_addr4, 444)


def test_start_services_on_extra_ports(lab: Lab) -> None:
    gw = lab.gateways[0]
    assert not lab.tcp_ok(lab.outside_ns, gw.internal_host4, 9000)
    lab.start_services(gw.internal_ns, tcp=[9000], udp=[9001])
    assert lab.tcp_ok(lab.outside_ns, gw.internal_host4, 9000)
    assert lab.tcp_ok(lab.outside_ns, gw.internal_host6, 9000)
    assert lab.udp_ok(lab.outside_ns, gw.internal_host6, 9001)


def test_destroy_removes_namespaces_and_processes(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory()
    gw = lab.gateways[0]
    sleeper = lab.popen(gw.ns, ["sleep", "600"])
    stream = lab.open_stream(gw.internal_ns, lab.outside_addr4, 80)
    pids = namespace_pids(lab.namespaces)
    assert sleeper.pid in pids and len(pids) >= 4  # 3 echo servers, sleep, stream probe
    workdir = lab.workdir
    started = time.monotonic()
    lab.destroy()
    elapsed = time.monotonic() - started
    assert list_namespaces(lab.prefix) == []
    assert sleeper.poll() is not None and stream.proc.poll() is not None
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    assert not workdir.exists()
    assert lab.destroyed and elapsed < 2.0
    lab.destroy()  # idempotent


OWNER = textwrap.dedent(
    """
    import sys, time
    from drawbridge_lab import Lab
    lab = Lab.create(gateways=1)
    print(lab.prefix, flush=True)
    time.sleep(120)
    """
)


def start_owner(tmp_path: Path) -> tuple[subprocess.Popen[str], str]:
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    prefix = proc.stdout.readline().strip()
    assert prefix.startswith(f"dbl-{proc.pid}-"), proc.stderr and proc.stderr.read()
    assert len(list_namespaces(prefix)) == 5
    return proc, prefix


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_tears_the_lab_down(tmp_path: Path, sig: signal.Signals) -> None:
    proc, prefix = start_owner(tmp_path)
    proc.send_signal(sig)
    proc.wait(timeout=10)
    assert list_namespaces(prefix) == []


def test_cleanup_stale_removes_dead_runs_only(tmp_path: Path, lab: Lab) -> None:
    proc, prefix = start_owner(tmp_path)
    proc.kill()  # no chance to clean up
    proc.wait(timeout=10)
    dead = list_namespaces(prefix)
    assert len(dead) == 5
    assert set(dead) <= set(cleanup_stale())
    assert list_namespaces(prefix) == []
    assert set(list_namespaces(lab.prefix)) == set(lab.namespaces)  # ours lives on
    assert lab.tcp_ok(lab.gateways[0].internal_ns, lab.outside_addr4, 443)


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")
def test_sshd_on_the_management_address(lab: Lab, tmp_path: Path) -> None:
    gw = lab.gateways[0]
    host_key, client_key = tmp_path / "host_key", tmp_path / "client_key"
    for key in (host_key, client_key):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
            check=True,
            capture_output=True,
        )
    authorized = tmp_path / "authorized_keys"
    authorized.write_text(Path(f"{client_key}.pub").read_text())
    for addr in (gw.mgmt_addr4, gw.mgmt_addr6):
        workdir = tmp_path / f"sshd-{ipaddress.ip_address(addr).version}"
        sshd = lab.start_sshd(
            gw.ns,
            addr,
            22,
            host_key_path=host_key,
            authorized_keys_path=authorized,
            workdir=workdir,
        )
        assert sshd.poll() is None
        assert lab.banner_ok(lab.mgmt_ns, addr, 22, "SSH-2.0")
        if shutil.which("ssh"):
            out = lab.run(
                lab.mgmt_ns,
                [
                    "ssh", "-i", str(client_key), "-p", "22",
                    "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                    "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                    f"root@{addr}", "echo", "hello-from-gateway",
                ],
                timeout=20,
            )  # fmt: skip
            assert out.stdout.strip() == "hello-from-gateway"
        assert (workdir / "sshd_config").exists()


# ------------------------------------------------------------------ several gateways


def test_three_gateways(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(gateways=3)
    assert len(lab.namespaces) == 3 * 3 + 2
    assert lab.outside_if == "br0" and lab.mgmt_if == "br0"
    assert len({gw.internal_networks for gw in lab.gateways}) == 3
    for gw in lab.gateways:
        for v4 in (True, False):
            out_addr = lab.outside_addr4 if v4 else lab.outside_addr6
            host = gw.internal_host4 if v4 else gw.internal_host6
            mgmt = gw.mgmt_addr4 if v4 else gw.mgmt_addr6
            vpn = gw.outside_addr4 if v4 else gw.outside_addr6
            assert lab.tcp_ok(gw.internal_ns, out_addr, 443), (gw.name, out_addr)
            assert lab.udp_ok(lab.outside_ns, host, 5353), (gw.name, host)
            assert lab.tcp_ok(lab.outside_ns, host, 80), (gw.name, host)
            assert lab.tcp_ok(lab.mgmt_ns, mgmt, 8443), (gw.name, mgmt)
            assert lab.ping_ok(lab.outside_ns, vpn), (gw.name, vpn)
    many = lab.check_many(
        [("icmp", lab.mgmt_ns, gw.mgmt_addr6, 0) for gw in lab.gateways]
        + [("udp", gw.internal2_ns, lab.outside_addr4, 53) for gw in lab.gateways]
        + [("tcp", gw.internal_ns, lab.outside_addr4, 444) for gw in lab.gateways]  # closed
    )
    assert many == [True] * 6 + [False] * 3
    # Site to site goes through both gateways and the internet's routes.
    a, c = lab.gateways[0], lab.gateways[2]
    assert lab.tcp_ok(a.internal_ns, c.internal_host4, 80)
    assert lab.tcp_ok(c.internal2_ns, a.internal_host6, 80)


@pytest.mark.skipif(
    not os.environ.get("DRAWBRIDGE_LAB_BIG"), reason="set DRAWBRIDGE_LAB_BIG=1 (50 gateways)"
)
def test_fifty_gateways(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(gateways=50)
    assert lab.build_seconds < 10.0
    checks = [
        check
        for gw in lab.gateways
        for check in (
            ("tcp", gw.internal_ns, lab.outside_addr6, 443),
            ("tcp", lab.outside_ns, gw.internal_host4, 80),
            ("udp", lab.mgmt_ns, gw.mgmt_addr6, 5353),
        )
    ]
    results = lab.check_many(checks)
    assert [c for c, ok in zip(checks, results, strict=True) if not ok] == []


# ------------------------------------------------------------------ the CLI


def test_cli_up_list_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRAWBRIDGE_LAB_STATE_DIR", str(tmp_path / "state"))
    env = dict(os.environ)

    def cli(*args: str) -> dict[str, object]:
        proc = subprocess.run(
            [sys.executable, "-m", "drawbridge_lab", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=True,
        )
        result: dict[str, object] = json.loads(proc.stdout)
        return result

    info = cli("up", "--gateways", "2")
    prefix = str(info["prefix"])
    try:
        assert len(list_namespaces(prefix)) == 2 * 3 + 2
        assert Path(str(info["state_file"])).exists()
        gateways = info["gateways"]
        assert isinstance(gateways, list) and gateways[1]["internal_host4"] == "10.21.1.10"
        # The services outlive the `up` process.
        probe = subprocess.run(
            ["ip", "netns", "exec", gateways[1]["internal_ns"], *PY, str(PROBE),
             "tcp", "2001:db8:100::10", "443"],
            check=False,
        )  # fmt: skip
        assert probe.returncode == 0
        # A kept lab is not "stale" although its creating process is gone.
        assert not [n for n in cleanup_stale() if n.startswith(prefix)]
        listed = cli("list")
        recorded = listed["recorded"]
        assert isinstance(recorded, list)
        assert [r["namespaces_present"] for r in recorded if r["prefix"] == prefix] == [8]
        removed = cli("down")["removed"]
        assert isinstance(removed, list) and len(removed) == 8
    finally:
        subprocess.run(
            [sys.executable, "-m", "drawbridge_lab", "down", prefix], env=env, check=False
        )
    assert list_namespaces(prefix) == []
    assert not Path(str(info["state_file"])).exists()
