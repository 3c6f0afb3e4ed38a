"""Audit integrity that survives its own operators, on both stores: a cut, replaced or
reordered chain is an alarm (at start and before every append), the head file's loss
too; writes are refused until an admin acknowledges; checkpoints signed with a key the
database never holds prove the chain up to their seq even when the database and the
head file were both rewritten with the chain key."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from controller.audit import AuditEvent, HistoryQuery, record_hash
from controller.audit_head import Head, HeadFile
from controller.auth import Role
from controller.checkpoint_keys import (
    CheckpointKey,
    SignedCheckpoint,
    claims_from,
    parse_checkpoint_file,
    signature_valid,
)
from controller.errors import AuditTampered, ConfigError, Conflict, Unauthorized
from controller.plans import parse_plan
from controller.schemas import Targets
from controller.service import Controller
from tests.storage import raw_sql
from tests.unit.test_controller_support import (
    ADMIN,
    OPERATOR,
    FakeFleet,
    make_config,
    make_controller,
)

ALL = Targets(all=True)


@pytest.fixture
def fake_fleet() -> FakeFleet:
    return FakeFleet(["gw0", "gw1"])


@pytest.fixture
def ctl(tmp_path: Path, fake_fleet: FakeFleet, db_url: str) -> Iterator[Controller]:
    c = make_controller(tmp_path, fake_fleet, db_url=db_url)
    c.isolate(OPERATOR, ALL, profile="full", reason="incident", ticket="INC-1")
    c.checkpoints.wait()
    yield c
    c.close()


def reopen(ctl: Controller, fake_fleet: FakeFleet, tmp_path: Path) -> Controller:
    ctl.close()
    return Controller(make_config(tmp_path, db_url=ctl.config.db_url),
                      session_factory=fake_fleet.factory).open()


def last_seq(db_url: str) -> int:
    return int(raw_sql(db_url, "SELECT max(seq) FROM audit_log")[0][0])


def alarm_metric(ctl: Controller) -> float:
    text = generate_latest(ctl.metrics.registry).decode()
    line = next(x for x in text.splitlines()
                if x.startswith("drawbridge_controller_audit_tamper_alarm "))
    return float(line.split()[1])


def rehash_from(db_url: str, key: bytes, start: int = 1) -> None:
    """The attacker with the chain key: recompute every hash from `start` on."""
    rows = raw_sql(db_url, "SELECT seq, ts_us, actor, action, outcome, targets, reason, "
                           "ticket, command_id, detail FROM audit_log ORDER BY seq")
    prev = "0" * 64
    for seq, ts, actor, action, outcome, targets, reason, ticket, cid, detail in rows:
        if seq < start:
            prev = raw_sql(db_url, "SELECT hash FROM audit_log WHERE seq = :s", s=seq)[0][0]
            continue
        digest = record_hash(key, seq=seq, ts_us=ts, actor=actor, action=action,
                             outcome=outcome, targets=targets, reason=reason, ticket=ticket,
                             command_id=cid, detail=detail, prev_hash=prev)
        raw_sql(db_url, "UPDATE audit_log SET prev_hash = :p, hash = :h WHERE seq = :s",
                p=prev, h=digest, s=seq)
        prev = digest


def rewrite_head(ctl: Controller) -> None:
    """... and the head file to match the rewritten database."""
    seq, digest = raw_sql(ctl.config.db_url,
                          "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")[0]
    HeadFile(ctl.config.audit_head_path).write(Head(int(seq), str(digest)))


def export(ctl: Controller, tmp_path: Path) -> Path:
    path = tmp_path / "checkpoints.json"
    path.write_text(ctl.checkpoints.export().model_dump_json())
    return path


def file_claims(ctl: Controller, path: Path) -> list[Any]:
    public, cps = parse_checkpoint_file(json.loads(path.read_text()), str(path))
    return claims_from(cps, source=str(path), file_public=public,
                       controller_public=ctl.checkpoints.key.public_raw)


# -- the head guard ------------------------------------------------------------------------


def test_a_cut_tail_is_an_alarm_before_the_next_append_even_an_anonymous_401(
        ctl: Controller, db_url: str) -> None:
    end = last_seq(db_url)
    raw_sql(db_url, "DELETE FROM audit_log WHERE seq > :s", s=end - 2)
    with pytest.raises(Unauthorized):
        ctl.authenticate("dbt_000000000000_" + "x" * 43, path="GET /v1/status")
    alarm = ctl.audit.alarm
    assert alarm is not None and f"#{end - 1} to #{end}" in alarm.problem
    assert alarm_metric(ctl) == 1.0
    # recorded at the database's end; the refusal itself was not (writes are refused)
    tail = ctl.history(HistoryQuery(limit=1))[-1]
    assert (tail.action, tail.seq) == ("audit.tamper_alarm", end - 1)
    assert not ctl.history(HistoryQuery(action="auth.refused"))
    with pytest.raises(AuditTampered):
        ctl.isolate(OPERATOR, ALL, profile="internet", reason="x", ticket=None)
    report = ctl.verify_audit()
    assert not report.ok and report.alarm and "missing from the end" in (report.problem or "")
    with pytest.raises(AuditTampered):
        ctl.plans.start(ADMIN, ALL, parse_plan({"stages": [{"name": "a", "restore": True}]}),
                        reason="r", ticket=None)
    rec = ctl.acknowledge_alarm(ADMIN, reason="backup restore cut two records; looked, "
                                "accepted", ticket="INC-2")
    assert rec.action == "audit.acknowledged" and rec.detail["alarm"]["expected"]["seq"] == end
    assert ctl.audit.alarm is None and alarm_metric(ctl) == 0.0
    # the acknowledgement is recorded, and the truth stays: the checkpoint made after the
    # isolate signed records that are gone
    report = ctl.verify_audit()
    assert "acknowledged" in report.notes[0]
    assert not report.ok and report.first_bad_seq is None
    assert f"checkpoint #{end}" in (report.problem or "")
    assert ctl.isolate(OPERATOR, ALL, profile="internet", reason="x", ticket=None).ok
    ctl.checkpoints.wait()
    assert ctl.audit.alarm is None  # a new checkpoint, from the acknowledged chain
    assert (ctl.checkpoints.store.last() or pytest.fail()).checkpoint.seq == last_seq(db_url)
    with pytest.raises(Conflict):
        ctl.acknowledge_alarm(ADMIN, reason="nothing to acknowledge", ticket=None)


def test_an_alarm_acknowledged_on_the_host_lifts_it_in_the_running_controller(
        ctl: Controller, fake_fleet: FakeFleet, tmp_path: Path, db_url: str) -> None:
    end = last_seq(db_url)
    raw_sql(db_url, "DELETE FROM audit_log WHERE seq > :s", s=end - 1)
    with pytest.raises(AuditTampered):
        ctl.isolate(OPERATOR, ALL, profile="internet", reason="x", ticket=None)
    # the alarm record itself does not satisfy the check: only an acknowledgement does
    assert ctl.audit.alarm is not None
    # `drawbridge-controller audit acknowledge`: another process on the same state dir
    host = Controller(make_config(tmp_path, db_url=db_url),
                      session_factory=fake_fleet.factory).open()
    try:
        assert host.audit.alarm is not None
        host.audit.acknowledge(actor="root@console", reason="restored from backup")
    finally:
        host.close()
    assert ctl.audit.alarm is None and alarm_metric(ctl) == 0.0  # no restart needed
    assert ctl.isolate(OPERATOR, ALL, profile="internet", reason="x", ticket=None).ok
    assert [r.actor for r in ctl.history(HistoryQuery(action="audit.acknowledged"))] == [
        "root@console"]
    # a later break is a new alarm, which the old acknowledgement does not lift
    raw_sql(db_url, "DELETE FROM audit_log WHERE seq = :s", s=last_seq(db_url))
    with pytest.raises(AuditTampered):
        ctl.isolate(OPERATOR, ALL, profile="internet", reason="y", ticket=None)
    assert ctl.audit.alarm is not None


def test_a_cut_tail_is_an_alarm_at_start(ctl: Controller, fake_fleet: FakeFleet,
                                         tmp_path: Path, db_url: str) -> None:
    end = last_seq(db_url)
    ctl.close()
    raw_sql(db_url, "DELETE FROM audit_log WHERE seq = :s", s=end)
    again = Controller(make_config(tmp_path, db_url=db_url),
                       session_factory=fake_fleet.factory).open()
    try:
        assert again.audit.alarm is not None
        assert f"record #{end} is missing" in again.audit.alarm.problem
        with pytest.raises(AuditTampered):
            again.create_token(user="eve", role=Role.admin, created_by="eve", reason="x")
        assert not again.verify_audit().ok
        # a restart that finds the same damage does not add a second alarm record
        again.close()
        again = Controller(make_config(tmp_path, db_url=db_url),
                           session_factory=fake_fleet.factory).open()
        alarms = again.history(HistoryQuery(action="audit.tamper_alarm"))
        assert len(alarms) == 1 and again.audit.alarm is not None
    finally:
        again.close()


def test_a_deleted_head_file_is_an_alarm_not_a_switch_off(
        ctl: Controller, fake_fleet: FakeFleet, tmp_path: Path, db_url: str) -> None:
    head = ctl.config.audit_head_path
    head.unlink()  # while it runs
    with pytest.raises(AuditTampered):
        ctl.record(AuditEvent(actor="x", action="probe", outcome="ok"))
    assert "vanished" in (ctl.audit.alarm.problem if ctl.audit.alarm else "")
    ctl.close()
    end = last_seq(db_url)
    raw_sql(db_url, "DELETE FROM audit_log WHERE seq > :s", s=end - 3)  # and the tail cut
    again = Controller(make_config(tmp_path, db_url=db_url),
                       session_factory=fake_fleet.factory).open()
    try:
        assert again.audit.alarm is not None and "missing" in again.audit.alarm.problem
        report = again.verify_audit()
        assert not report.ok and "head file" in (report.problem or "")
    finally:
        again.close()


def test_a_lost_audit_key_stops_the_start_instead_of_starting_a_new_key(
        ctl: Controller, fake_fleet: FakeFleet, tmp_path: Path, db_url: str) -> None:
    key_path = ctl.config.audit_key_path
    saved = key_path.read_bytes()
    records = last_seq(db_url)
    ctl.close()
    key_path.unlink()  # lost with the disk, or a replica set up without it
    with pytest.raises(ConfigError) as err:
        Controller(make_config(tmp_path, db_url=db_url),
                   session_factory=fake_fleet.factory).open()
    assert f"audit chain of {records} records" in str(err.value)
    assert not key_path.exists()  # no new key was made
    assert last_seq(db_url) == records  # and nothing was recorded
    key_path.write_bytes(saved)  # restored from the backup: it starts, the chain verifies
    again = Controller(make_config(tmp_path, db_url=db_url),
                       session_factory=fake_fleet.factory).open()
    try:
        assert again.verify_audit().ok and again.audit.alarm is None
    finally:
        again.close()


def test_an_edited_or_replaced_head_record_is_an_alarm(ctl: Controller, db_url: str) -> None:
    end = last_seq(db_url)
    raw_sql(db_url, "UPDATE audit_log SET hash = :h WHERE seq = :s", h="f" * 64, s=end)
    with pytest.raises(AuditTampered):
        ctl.isolate(OPERATOR, ALL, profile="internet", reason="x", ticket=None)
    assert "not the record the controller wrote" in (ctl.audit.alarm.problem
                                                     if ctl.audit.alarm else "")


def test_writes_are_durable_before_ok(ctl: Controller, db_url: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    ctl.probe(OPERATOR, ALL, reason="")
    assert len(synced) >= 2  # the head, after each record
    if ctl.db.dialect == "sqlite":
        with ctl.db.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


# -- checkpoints ---------------------------------------------------------------------------


def test_checkpoint_key_file_signature_and_forgery(tmp_path: Path) -> None:
    path = tmp_path / "cp.key"
    key = CheckpointKey.load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert CheckpointKey.load_or_create(path).key_id == key.key_id
    cp = key.sign(7, "ab" * 32, 1_750_000_000.1234567)
    assert cp.time == 1_750_000_000.123457  # whole microseconds: what is stored is signed
    assert signature_valid(cp, key.public_raw)
    hexed = cp.model_copy(update={"signature": base64.b64decode(cp.signature).hex()})
    assert signature_valid(hexed, key.public_raw)  # base64 or hex
    for forged in (cp.model_copy(update={"head_hash": "cd" * 32}),
                   cp.model_copy(update={"seq": 8}),
                   cp.model_copy(update={"time": cp.time + 1})):
        assert not signature_valid(forged, key.public_raw)
    other = CheckpointKey.load_or_create(tmp_path / "other.key")
    theirs = other.sign(7, "ab" * 32, 1.0)
    [claim] = claims_from([theirs], source="f", controller_public=key.public_raw)
    assert claim.problem is not None and "neither" in claim.problem
    [claim] = claims_from([theirs], source="f", controller_public=key.public_raw,
                          file_public=other.public_raw)
    assert claim.problem is None and "not the controller's" in claim.key


def test_checkpoints_go_to_every_gateway_and_misses_are_audited(
        ctl: Controller, fake_fleet: FakeFleet) -> None:
    made = ctl.checkpoints.store.last()
    assert made is not None and made.recorded_on == ["gw0", "gw1"]  # after the isolate
    entry = [e for e in fake_fleet.agents["gw0"].journal if e["action"] == "checkpoint"][-1]
    assert (entry["seq"], entry["head_hash"]) == (made.checkpoint.seq,
                                                  made.checkpoint.head_hash)
    assert ctl.checkpoints.make("interval") is None  # nothing new
    fake_fleet.agents["gw1"].up = False
    fake_fleet.agents["gw0"].knows_checkpoints = False
    ctl.probe(OPERATOR, Targets(gateways=("gw0",)), reason="")
    cp = ctl.checkpoints.make("interval")
    assert cp is not None and cp.recorded_on == []
    [missed] = ctl.history(HistoryQuery(action="audit.checkpoint"))
    assert missed.outcome == "failed" and set(missed.targets) == {"gw0", "gw1"}
    assert "connection refused" in missed.detail["missed"]["gw1"]
    # only that bookkeeping since: the interval does not checkpoint it again
    assert ctl.checkpoints.make("interval") is None
    text = generate_latest(ctl.metrics.registry).decode()
    assert 'drawbridge_controller_audit_checkpoint_misses_total{gateway="gw1"} 1.0' in text


def test_checkpoints_prove_the_chain_when_database_and_head_were_rewritten_with_the_key(
        ctl: Controller, fake_fleet: FakeFleet, tmp_path: Path, db_url: str) -> None:
    ctl.restore(ADMIN, ALL, reason="all clear", ticket=None)
    ctl.checkpoints.wait()
    path = export(ctl, tmp_path)
    covered = json.loads(path.read_text())["checkpoints"][-1]["seq"]
    assert ctl.verify_audit(file_claims(ctl, path)).ok
    key = ctl.audit.key
    # the attacker: edit a record before the checkpoint, re-hash the chain with the key,
    # rewrite the head file, and wipe the stored checkpoints
    raw_sql(db_url, "UPDATE audit_log SET reason = 'routine maintenance' "
                    "WHERE action = 'isolate' AND outcome = 'ok'")
    rehash_from(db_url, key)
    rewrite_head(ctl)
    raw_sql(db_url, "DELETE FROM audit_checkpoints")
    assert ctl.verify_audit().ok  # the chain and the head agree: undetectable without
    report = ctl.verify_audit(file_claims(ctl, path))
    assert not report.ok
    failed = [c for c in report.checkpoints if not c.ok]
    assert failed and all("rewritten" in (c.problem or "") for c in failed)
    assert failed[-1].seq == covered


@pytest.mark.parametrize("attack", ["truncate", "reorder", "edit", "truncate_without_key",
                                    "reorder_without_key", "edit_without_key"])
def test_checkpoints_catch_cut_and_reordered_chains(
        ctl: Controller, fake_fleet: FakeFleet, tmp_path: Path, db_url: str,
        attack: str) -> None:
    ctl.restore(ADMIN, ALL, reason="all clear", ticket=None)
    ctl.checkpoints.wait()
    path = export(ctl, tmp_path)
    seq = json.loads(path.read_text())["checkpoints"][-1]["seq"]
    key = ctl.audit.key
    if attack.startswith("truncate"):
        raw_sql(db_url, "DELETE FROM audit_log WHERE seq >= :s", s=seq - 1)
    elif attack.startswith("reorder"):  # swap two records before the checkpoint
        for a, b in ((2, -1), (3, 2), (-1, 3)):
            raw_sql(db_url, "UPDATE audit_log SET seq = :b WHERE seq = :a", a=a, b=b)
    else:  # edit a record in the middle
        raw_sql(db_url, "UPDATE audit_log SET reason = 'nothing' WHERE seq = 3")
    with_key = not attack.endswith("_without_key")
    if with_key:
        rehash_from(db_url, key)
    rewrite_head(ctl)
    raw_sql(db_url, "DELETE FROM audit_checkpoints")
    ctl = reopen(ctl, fake_fleet, tmp_path)  # the head agrees: no alarm at start
    try:
        assert ctl.audit.alarm is None
        report = ctl.verify_audit(file_claims(ctl, path))
        assert not report.ok
        [claim] = [c for c in report.checkpoints if c.seq == seq]
        assert not claim.ok
        if attack.startswith("truncate"):
            assert "removed" in (claim.problem or "")
        plain = ctl.verify_audit()
        if with_key or attack.startswith("truncate"):
            # chain, head and stored checkpoints all consistent: only the file still tells
            assert plain.ok
        else:  # without the key the chain itself names the record
            assert not plain.ok and plain.first_bad_seq in (2, 3)
    finally:
        ctl.close()


def test_an_altered_checkpoint_file_is_named(ctl: Controller, tmp_path: Path) -> None:
    path = export(ctl, tmp_path)
    data = json.loads(path.read_text())
    data["checkpoints"][-1]["head_hash"] = "0" * 64
    path.write_text(json.dumps(data))
    report = ctl.verify_audit(file_claims(ctl, path))
    assert not report.ok and "signature does not verify" in (report.problem or "")


def test_a_checkpoint_never_signs_a_broken_chain(ctl: Controller, db_url: str) -> None:
    ctl.probe(OPERATOR, ALL, reason="")
    raw_sql(db_url, "UPDATE audit_log SET reason = 'x' WHERE seq = :s", s=last_seq(db_url))
    assert ctl.checkpoints.make("asked for") is None
    assert ctl.audit.alarm is not None and "checkpoint" in ctl.audit.alarm.problem


def test_signed_checkpoint_model_refuses_garbage() -> None:
    with pytest.raises(ValueError):
        SignedCheckpoint(seq=0, head_hash="x", time=0.0, signature="s", key_id="k")
