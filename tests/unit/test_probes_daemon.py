"""The daemon's probe sweep: a changed verdict is recorded, a stale one never overwrites
a newer change. The kernel edge and the network are fakes here."""

from __future__ import annotations

from pathlib import Path

from agent.daemon import Daemon
from agent.engine import Engine
from agent.probes_bridge import ProbeService
from agent.state import DesiredState, VerificationResult
from tests.unit.fakes import RecordingNft, no_reference
from tests.unit.test_probes_verify import MGMT, WEB, FakeNet, probes_config


def make_daemon(tmp_path: Path, reachable: set[str]) -> tuple[Daemon, FakeNet]:
    cfg = probes_config(tmp_path, WEB, MGMT)
    net = FakeNet(reachable)
    engine = Engine(cfg, nft=RecordingNft(), references=no_reference)  # type: ignore[arg-type]
    return Daemon(cfg, engine, ProbeService(cfg.probes, runner=net)), net


def test_daemon_wires_verifier_probe_op_and_apply_timing(tmp_path: Path) -> None:
    daemon, _ = make_daemon(tmp_path, reachable={"outside-web", "mgmt-ssh"})
    assert daemon.engine.kernel.on_apply is not None
    response = daemon.dispatcher.handle_line(b'{"v": 1, "op": "probe"}')
    assert [p["name"] for p in response["result"]["probes"]] == ["outside-web", "mgmt-ssh"]
    daemon.engine.kernel.on_apply(0.02)
    buckets, total = daemon.apply_durations.snapshot()
    assert total == 0.02 and dict(buckets)["0.025"] == 1


def test_sweep_records_a_changed_verdict_once(tmp_path: Path) -> None:
    daemon, net = make_daemon(tmp_path, reachable={"mgmt-ssh"})
    store = daemon.engine.store
    store.save(DesiredState(profile="internet", generation=3))
    daemon.health.in_sync = True
    daemon.probe_sweep()
    state = store.load()
    assert (state.verification.status, state.generation) == ("verified", 3)
    assert [e["action"] for e in store.read_journal()] == ["verify"]
    daemon.probe_sweep()  # same verdict: nothing written
    assert len(store.read_journal()) == 1
    net.reachable.add("outside-web")  # a leak appears
    daemon.probe_sweep()
    state = store.load()
    assert (state.verification.status, state.verification.failing) == \
        ("unverified", ("outside-web",))
    last = store.read_journal()[-1]
    assert (last["action"], last["result"], last["failing"]) == \
        ("verify", "unverified", ["outside-web"])
    assert daemon.probes.latest()["outside-web"].ok is False


def test_sweep_keeps_a_readback_failure(tmp_path: Path) -> None:
    daemon, _ = make_daemon(tmp_path, reachable={"mgmt-ssh"})
    daemon.health.in_sync = False
    daemon.engine.store.save(DesiredState(profile="internet"))
    daemon.probe_sweep()
    assert daemon.engine.store.load().verification.failing == ("readback",)


def test_stale_sweep_never_overwrites_a_newer_change(tmp_path: Path) -> None:
    daemon, _ = make_daemon(tmp_path, reachable=set())
    store = daemon.engine.store
    seen = DesiredState(profile="internet", generation=4)
    newer = DesiredState(profile=None, generation=5,
                         verification=VerificationResult(status="verified"))
    store.save(newer)  # a restore landed while the sweep was probing
    verdict = VerificationResult(status="unverified", failing=("mgmt-ssh",))
    assert daemon.record_verification(seen, verdict) is False
    assert store.load() == newer


def test_without_probes_the_sweep_records_the_readback(tmp_path: Path) -> None:
    cfg = probes_config(tmp_path)
    daemon = Daemon(cfg, Engine(cfg, nft=RecordingNft(), references=no_reference))  # type: ignore[arg-type]
    daemon.health.in_sync = True
    daemon.probe_sweep()
    assert daemon.engine.store.load().verification.status == "verified"
