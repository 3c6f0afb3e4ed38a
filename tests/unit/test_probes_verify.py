"""Verification: a state is verified only when the read-back matches and every probe
with an expectation for that state agrees. Probe execution is replaced by a fake here
(except the loopback sweep at the end); the lab tests send real packets."""

from __future__ import annotations

import ast
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.config import ProbeConfig
from agent.engine import Engine
from agent.probe_sweep import measure
from agent.probe_types import Measurement, ProbeSpec
from agent.probes import ProbeResult, judge, run_probes
from agent.probes_bridge import ProbeService, probe_handler, verification_from, verifier_for
from agent.requests import IsolateRequest, RestoreRequest
from agent.rpc import Dispatcher
from agent.state import DesiredState
from tests.unit.conftest import make_config
from tests.unit.fakes import RecordingNft, no_reference

WEB = {"name": "outside-web", "type": "tcp", "target": "198.51.100.10:443",
       "expect": {"open": "reachable", "isolated": "unreachable"}}
MGMT = {"name": "mgmt-ssh", "type": "tcp-syn", "target": "10.99.0.10:22",
        "expect": {"open": "reachable", "isolated": "reachable"}}
ANY_WHEN_ISOLATED = {"name": "dns6", "type": "dns", "target": "2001:db8::53",
                     "expect": {"open": "reachable"}}


class FakeNet:
    """Decides what each probe finds: `reachable` names are reachable, the rest are not."""

    def __init__(self, reachable: set[str]) -> None:
        self.reachable = reachable
        self.runs: list[list[str]] = []

    def __call__(self, probes: Sequence[ProbeConfig], *, isolated: bool) -> list[ProbeResult]:
        self.runs.append([p.name for p in probes])
        by_address = {p.address: p.name for p in probes}

        def fake_measure(specs: Sequence[ProbeSpec]) -> list[Measurement]:
            out = []
            for spec in specs:
                name = by_address[spec.address]
                if name in self.reachable:
                    out.append(Measurement("reachable", "connected", 0.002))
                else:
                    out.append(Measurement("unreachable", "timeout", spec.timeout))
            return out

        return run_probes(probes, isolated=isolated, measure_fn=fake_measure, clock=lambda: 50.0)


def probes_config(tmp_path: Path, *probes: dict[str, Any]) -> Any:
    return make_config(tmp_path, probes=list(probes))


def test_judge() -> None:
    assert judge("reachable", "reachable")
    assert judge("unreachable", "unreachable")
    assert not judge("reachable", "unreachable")
    assert not judge("error", "unreachable")  # an error proves nothing
    assert judge("error", "any")


def test_run_probes_judges_against_the_state(tmp_path: Path) -> None:
    cfg = probes_config(tmp_path, WEB, ANY_WHEN_ISOLATED)
    net = FakeNet(reachable={"outside-web"})
    isolated = net(cfg.probes, isolated=True)
    assert [(r.name, r.outcome, r.expected, r.ok) for r in isolated] == [
        ("outside-web", "reachable", "unreachable", False),
        ("dns6", "unreachable", "any", True),
    ]
    opened = net(cfg.probes, isolated=False)
    assert [(r.expected, r.ok) for r in opened] == [("reachable", True), ("reachable", False)]
    assert isolated[0].describe() == \
        "outside-web: expected unreachable, got reachable (connected) in 2 ms"
    assert set(isolated[0].to_dict()) >= {"name", "type", "target", "outcome", "expected",
                                          "ok", "duration_seconds"}


def result(name: str, ok: bool) -> ProbeResult:
    return ProbeResult(name=name, type="tcp", target="192.0.2.1:1", outcome="reachable",
                       detail="connected", expected="reachable" if ok else "unreachable",
                       ok=ok, duration_seconds=0.001, checked_at=1.0)


def test_verification_from() -> None:
    assert verification_from([result("a", True)], True, 5.0).status == "verified"
    v = verification_from([result("a", True), result("b", False)], True, 5.0)
    assert (v.status, v.failing, v.checked_at) == ("unverified", ("b",), 5.0)
    assert "b: expected unreachable" in v.detail[0]
    v = verification_from([result("b", False)], False, 5.0)
    assert v.failing == ("readback", "b")
    assert verification_from([], True, 5.0).status == "verified"
    assert verification_from([], False, 5.0).failing == ("readback",)


def test_verify_runs_only_probes_with_an_expectation(tmp_path: Path) -> None:
    cfg = probes_config(tmp_path, WEB, MGMT, ANY_WHEN_ISOLATED)
    net = FakeNet(reachable={"mgmt-ssh"})
    service = ProbeService(cfg.probes, runner=net, clock=lambda: 7.0)
    v = service.verify(DesiredState(profile="internet"), True)
    assert net.runs == [["outside-web", "mgmt-ssh"]]
    assert (v.status, v.failing, v.checked_at) == ("verified", (), 7.0)
    v = service.verify(DesiredState(profile=None), True)
    assert net.runs[-1] == ["outside-web", "mgmt-ssh", "dns6"]
    assert (v.status, v.failing) == ("unverified", ("outside-web", "dns6"))


def test_latest_results_are_rejudged_for_the_new_state(tmp_path: Path) -> None:
    cfg = probes_config(tmp_path, WEB, ANY_WHEN_ISOLATED)
    service = ProbeService(cfg.probes, runner=FakeNet(reachable={"outside-web"}))
    service.run(isolated=False)
    assert service.latest()["dns6"].ok is False  # open: dns6 should be reachable
    assert service.last_sweep_at is not None
    service.verify(DesiredState(profile="internet"), True)  # dns6: any when isolated
    latest = service.latest()
    assert (latest["dns6"].ok, latest["dns6"].expected, latest["dns6"].outcome) == \
        (True, "any", "unreachable")
    assert (latest["outside-web"].ok, latest["outside-web"].expected) == (False, "unreachable")


def test_report_is_what_the_cli_prints(tmp_path: Path) -> None:
    cfg = probes_config(tmp_path, WEB, ANY_WHEN_ISOLATED)
    service = ProbeService(cfg.probes, runner=FakeNet(reachable={"outside-web"}))
    report = service.report(DesiredState(profile="casefiles"))
    assert report["state"] == "isolated" and report["profile"] == "casefiles"
    assert [p["name"] for p in report["probes"]] == ["outside-web", "dns6"]
    assert report["failing"] == ["outside-web"] and report["ok"] is False
    for p in report["probes"]:
        assert {"name", "type", "target", "outcome", "expected", "ok", "duration_seconds"} <= set(p)
    empty = ProbeService(()).report(DesiredState())
    assert empty["probes"] == [] and empty["note"] == "no probes configured"


def test_without_probes_the_readback_alone_verifies(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    verifier = verifier_for(cfg)
    assert verifier(DesiredState(), True).status == "verified"
    assert verifier(DesiredState(), False).failing == ("readback",)
    assert probe_handler(cfg)()["note"] == "no probes configured"


def test_engine_reports_failing_probes_by_name(tmp_path: Path) -> None:
    cfg = probes_config(tmp_path, WEB, MGMT)
    service = ProbeService(cfg.probes, runner=FakeNet(reachable={"outside-web", "mgmt-ssh"}))
    engine = Engine(cfg, nft=RecordingNft(), verifier=verifier_for(cfg, service),  # type: ignore[arg-type]
                    references=no_reference)
    dispatcher = Dispatcher(engine, probe=probe_handler(cfg, service))
    change = engine.isolate(IsolateRequest(profile="internet", reason="t", actor="a"))
    # the fake kernel holds no table, so the read-back differs too
    assert change.verification.status == "unverified"
    assert change.verification.failing == ("readback", "outside-web")
    assert engine.store.load().verification.failing == ("readback", "outside-web")
    response = dispatcher.handle_line(b'{"v": 1, "id": "p", "op": "probe"}')
    assert response["ok"] and response["result"]["failing"] == ["outside-web"]
    restored = engine.restore(RestoreRequest(reason="t", actor="a"))
    assert (restored.in_sync, restored.verification.status) == (True, "verified")


# -- the measuring loop on loopback (no root needed: tcp connect and dns only) -----------


@pytest.fixture
def udp_echo() -> Iterator[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(4096)
            except TimeoutError:
                continue
            sock.sendto(data, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    stop.set()
    thread.join()
    sock.close()


def test_loopback_sweep_tcp_and_dns(udp_echo: int) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    open_port = listener.getsockname()[1]
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]  # bound, not listening: connect is refused
    udp_closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp_closed.bind(("127.0.0.1", 0))
    udp_closed_port = udp_closed.getsockname()[1]
    udp_closed.close()
    try:
        # every target answers: none may wait for its (long) timeout. The margin is wide
        # on purpose: a loaded CI machine is slow, a probe that waits is 5 s late.
        specs = [ProbeSpec.parse(f"tcp:127.0.0.1:{open_port}", 5.0),
                 ProbeSpec.parse(f"tcp:127.0.0.1:{closed_port}", 5.0),
                 ProbeSpec.parse(f"dns:127.0.0.1:{udp_echo}", 5.0),
                 ProbeSpec.parse(f"dns:127.0.0.1:{udp_closed_port}", 5.0)]
        started = time.monotonic()
        found = measure(specs)
        assert time.monotonic() - started < 4.5
    finally:
        listener.close()
        closed.close()
    assert [(m.outcome, m.detail) for m in found] == [
        ("reachable", "connected"), ("reachable", "refused"),
        ("reachable", "answer rcode=0"), ("reachable", "port-unreachable")]
    assert all(0 <= m.duration_seconds < 4.5 for m in found)


def test_silent_dns_target_times_out_alone(udp_echo: int) -> None:
    """A probe that gets no answer waits for its own timeout only; the others finish."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))  # bound, never answers
    try:
        started = time.monotonic()
        found = measure([ProbeSpec.parse(f"dns:127.0.0.1:{silent.getsockname()[1]}", 0.3),
                         ProbeSpec.parse(f"dns:127.0.0.1:{udp_echo}", 2.0)])
        elapsed = time.monotonic() - started
    finally:
        silent.close()
    assert (found[0].outcome, found[0].detail) == ("unreachable", "no-reply")
    assert 0.29 <= found[0].duration_seconds < 0.6
    assert found[1].outcome == "reachable" and found[1].duration_seconds < 0.25
    assert elapsed < 0.6  # not the 2 s timeout of the answered probe


def test_raw_probes_without_privilege_are_errors_not_unreachable() -> None:
    """Not being allowed to send must never read as "unreachable": that would verify an
    isolation nobody checked. (Loopback only; run unprivileged.)"""
    code = ("from agent.probe_sweep import measure; from agent.probe_types import ProbeSpec; "
            "print([(m.outcome, m.detail) for m in measure(["
            "ProbeSpec.parse('icmp:127.0.0.1'), ProbeSpec.parse('tcp-syn:[::1]:9')])])")
    argv = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv to drop root")
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    found = ast.literal_eval(out.stdout.strip())
    assert [o for o, _ in found] == ["error", "error"]
    assert "CAP_NET_RAW" in found[0][1]
