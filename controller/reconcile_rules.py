"""Comparing the controller's story with a gateway's (pure): what the audit log says the
controller ordered, and what the gateway's journal says happened.

Every change the controller orders carries its command id as the request id and
the hash of its `requested` record (the agent journals both), so the two stories
are joined on the request id, never on times or guesses:

- a change in the journal with no order of that id: the controller never ordered
  it (break-glass on the console, or worse);
- an order the controller recorded as applied (the agent said so), or whose outcome
  it never learnt (it stopped meanwhile), that the journal does not hold: it never
  arrived, or the journal lost it;
- both, with different outcomes (the controller recorded verified, the gateway
  failed; the controller recorded unreachable, the gateway applied it; ...), or a
  journal entry that names an audit record the controller does not have;
- a checkpoint the controller sent and the gateway recorded that is missing from
  the journal, or a checkpoint in the journal that the controller's chain no
  longer holds (or whose signature does not verify).

Entries of the agent's own loops (repair, verify, bypass, confirm, rollback) are
not orders and are not compared.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from controller.audit import AuditRecord

CHANGE_ACTIONS = ("isolate", "restore", "allow", "extend", "revoke")
# the agent answered that it applied the change: its journal must hold it (a refusal,
# "failed", may come before the agent journals anything: bad arguments, busy, ...)
APPLIED = ("verified", "applied", "unverified")

Kind = Literal["unordered", "missing", "outcome_differs", "audit_differs",
               "checkpoint_missing", "checkpoint_differs"]


class Difference(BaseModel):
    model_config = ConfigDict(frozen=True)

    gateway: str
    kind: Kind
    message: str
    command_id: str | None = None
    seq: int | None = None  # the controller's record (requested, or the checkpoint's)
    at: float | None = None  # when (the journal's time, else the controller's)
    journal: dict[str, Any] | None = None


@dataclass
class Order:
    """One command as the controller recorded it, for one gateway."""

    command_id: str
    op: str
    at: float
    seq: int  # the first `requested` record
    actor: str
    hashes: set[str] = field(default_factory=set)  # every `requested` record (resends)
    outcome: str | None = None  # this gateway's result in the last result record
    result_seq: int | None = None


@dataclass(frozen=True)
class SentCheckpoint:
    """A checkpoint the controller made, and whether this gateway recorded it."""

    seq: int
    head_hash: str
    at: float
    recorded: bool


def orders_for(gateway: str, records: Iterable[AuditRecord]) -> dict[str, Order]:
    """The changes the controller ordered `gateway` to make, by command id (pure)."""
    orders: dict[str, Order] = {}
    for rec in sorted(records, key=lambda r: r.seq):
        op = rec.detail.get("op")
        if rec.command_id is None or op not in CHANGE_ACTIONS or gateway not in rec.targets:
            continue
        order = orders.get(rec.command_id)
        if rec.outcome == "requested":
            if order is None:
                order = orders[rec.command_id] = Order(
                    command_id=rec.command_id, op=str(op), at=rec.ts_us / 1e6, seq=rec.seq,
                    actor=rec.actor)
            order.hashes.add(rec.hash)
            continue
        if order is None:
            continue  # a result whose request is outside the window
        for res in rec.detail.get("results") or []:
            if isinstance(res, dict) and res.get("gateway") == gateway:
                order.outcome = str(res.get("outcome"))
                order.result_seq = rec.seq
    return orders


def journal_outcome(entry: Mapping[str, Any]) -> str:
    """What the gateway made of a change, in the controller's words ("noop": it was in
    force already, nothing was applied)."""
    if entry.get("result") == "noop":
        return "noop"
    if entry.get("result") != "applied":
        return "failed"
    if entry.get("in_sync") is False or entry.get("verification") == "unverified":
        return "unverified"
    if entry.get("verification") == "verified":
        return "verified"
    return "applied"


def _same_outcome(controller: str, gateway: str) -> bool:
    if controller == gateway:
        return True
    if gateway == "noop":  # already in force: whatever proof the controller was given
        return controller in APPLIED
    # "applied": no verification to speak of (a restore without probes, an exception
    # change); the gateway may still have called it verified
    return controller == "applied" and gateway in ("verified", "applied")


def _checkpoint_of(entry: Mapping[str, Any]) -> tuple[int, str] | None:
    data = entry.get("checkpoint") if isinstance(entry.get("checkpoint"), dict) else entry
    assert isinstance(data, Mapping)
    seq, head = data.get("seq"), data.get("head_hash")
    if isinstance(seq, int) and isinstance(head, str):
        return seq, head
    return None


def compare(gateway: str, orders: Mapping[str, Order], entries: Sequence[Mapping[str, Any]],
            *, window_start: float, sent: Sequence[SentCheckpoint] = (),
            chain: Mapping[int, str | None] | None = None,
            bad_signatures: Iterable[int] = ()) -> list[Difference]:
    """Every difference between the controller's orders (`orders`, from a little before
    `window_start`, so that a change just after it still finds its order) and the
    gateway's journal `entries` (from `window_start`). `chain`: the controller's record
    hash at each seq a journal checkpoint names (None: no such record);
    `bad_signatures`: journal checkpoints (by seq) whose signature does not verify."""
    out: list[Difference] = []
    seen: dict[str, Mapping[str, Any]] = {}
    checkpoints: dict[int, str] = {}
    bad = set(bad_signatures)
    for entry in entries:
        at = float(entry.get("time") or 0.0)
        action = entry.get("action")
        if action == "checkpoint":
            found = _checkpoint_of(entry)
            if found is not None:
                checkpoints[found[0]] = found[1]
                out.extend(_journal_checkpoint(gateway, found, at, chain or {}, bad, entry))
            continue
        if action not in CHANGE_ACTIONS or at < window_start or entry.get("replayed") \
                or entry.get("result") == "replayed":
            continue
        request_id = entry.get("request_id")
        order = orders.get(request_id) if isinstance(request_id, str) else None
        if order is None:
            who = entry.get("actor") or "?"
            how = "on the gateway itself (its own CLI)" if str(request_id).startswith("cli-") \
                else ("with no request id" if not request_id
                      else f"under request id {request_id!r}, which the controller never used")
            out.append(Difference(
                gateway=gateway, kind="unordered", at=at, journal=dict(entry),
                command_id=request_id if isinstance(request_id, str) else None,
                message=f"{action} ({entry.get('profile') or '-'}) {entry.get('result')} by "
                        f"{who} {how}: the controller never ordered it"
                        + (f"; reason: {entry.get('reason')}" if entry.get("reason") else "")))
            continue
        seen[order.command_id] = entry
        out.extend(_matched(gateway, order, entry, at))
    for order in orders.values():
        if order.at < window_start or order.command_id in seen:
            continue
        if order.outcome is not None and order.outcome not in APPLIED:
            continue  # the controller knows it was not applied (unreachable, refused)
        said = f"recorded as {order.outcome}" if order.outcome else \
            "with no result recorded (the controller stopped while it was under way)"
        out.append(Difference(
            gateway=gateway, kind="missing", command_id=order.command_id, seq=order.seq,
            at=order.at,
            message=f"{order.op} {order.command_id} (#{order.seq}, by {order.actor}), "
                    f"{said}, is not in the gateway's journal: it never arrived, or the "
                    "journal lost it"))
    for cp in sent:
        if not cp.recorded or cp.at < window_start:
            continue
        if cp.seq not in checkpoints:
            out.append(Difference(
                gateway=gateway, kind="checkpoint_missing", seq=cp.seq, at=cp.at,
                message=f"checkpoint #{cp.seq} was recorded by the gateway when it was sent, "
                        "and is not in its journal now"))
        elif checkpoints[cp.seq] != cp.head_hash:
            out.append(Difference(
                gateway=gateway, kind="checkpoint_differs", seq=cp.seq, at=cp.at,
                message=f"checkpoint #{cp.seq} in the journal names head "
                        f"{checkpoints[cp.seq][:16]}..., the controller sent "
                        f"{cp.head_hash[:16]}..."))
    return sorted(out, key=lambda d: (d.at or 0.0, d.kind))


def _matched(gateway: str, order: Order, entry: Mapping[str, Any],
             at: float) -> list[Difference]:
    out: list[Difference] = []
    audit = entry.get("audit")
    if audit and audit not in order.hashes:
        out.append(Difference(
            gateway=gateway, kind="audit_differs", command_id=order.command_id, seq=order.seq,
            at=at, journal=dict(entry),
            message=f"the journal's {entry.get('action')} {order.command_id} names audit record "
                    f"{str(audit)[:16]}..., which is not the controller's record of that "
                    "command: the request id was reused, or the controller's log rewritten"))
    if entry.get("action") != order.op:
        out.append(Difference(
            gateway=gateway, kind="outcome_differs", command_id=order.command_id,
            seq=order.seq, at=at, journal=dict(entry),
            message=f"{order.command_id}: the controller ordered {order.op}, the journal "
                    f"records {entry.get('action')}"))
        return out
    theirs = journal_outcome(entry)
    ours = order.outcome
    if ours is not None and not _same_outcome(ours, theirs):
        out.append(Difference(
            gateway=gateway, kind="outcome_differs", command_id=order.command_id,
            seq=order.result_seq or order.seq, at=at, journal=dict(entry),
            message=f"{order.op} {order.command_id}: the controller recorded {ours}, the "
                    f"gateway {theirs}" + (f" ({entry.get('error')})" if entry.get("error")
                                           else "")))
    return out


def _journal_checkpoint(gateway: str, found: tuple[int, str], at: float,
                        chain: Mapping[int, str | None], bad: set[int],
                        entry: Mapping[str, Any]) -> list[Difference]:
    seq, head = found
    if seq in bad:
        return [Difference(gateway=gateway, kind="checkpoint_differs", seq=seq, at=at,
                           journal=dict(entry),
                           message=f"checkpoint #{seq} in the journal does not carry a valid "
                                   "signature of the controller's checkpoint key: forged")]
    if seq not in chain:
        return []
    ours = chain[seq]
    if ours is None:
        return [Difference(gateway=gateway, kind="checkpoint_differs", seq=seq, at=at,
                           journal=dict(entry),
                           message=f"checkpoint #{seq} in the journal signs a record the "
                                   "controller's audit log no longer has: records were removed")]
    if ours != head:
        return [Difference(gateway=gateway, kind="checkpoint_differs", seq=seq, at=at,
                           journal=dict(entry),
                           message=f"checkpoint #{seq} in the journal signs head {head[:16]}..., "
                                   f"the controller's record #{seq} is {ours[:16]}...: the "
                                   "chain was rewritten up to there")]
    return []
