"""`drawbridge audit reconcile`: each gateway's journal against the controller's history.

The I/O edge of controller/reconcile_rules.py (which holds the rules): read each
gateway's journal (op `journal`, on the poll lane, in parallel), the controller's
records about that gateway and the checkpoints it sent, and compare.

The window: from `since` (default: as far back as the journal goes), never before
the gateway joined the inventory (what it did before is no order of this
controller's) nor before the oldest journal entry read when the journal had more
than `JOURNAL_LIMIT` entries. Orders are read from `SLACK` seconds earlier, so that
a change journaled just inside the window still finds its order.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from controller.audit import HistoryQuery
from controller.checkpoint_keys import SignedCheckpoint, signature_valid
from controller.errors import AgentError, ControllerError
from controller.inventory import Gateway
from controller.reconcile_rules import Difference, SentCheckpoint, compare, orders_for
from controller.transport.link import GatewayLink

if TYPE_CHECKING:
    from controller.service import Controller

log = logging.getLogger("drawbridge.controller.reconcile")

JOURNAL_LIMIT = 10_000  # the agent's maximum per request
SLACK = 3600.0
HISTORY_LIMIT = 1_000_000


class GatewayReconcile(BaseModel):
    model_config = ConfigDict(frozen=True)

    gateway: str
    ok: bool
    reachable: bool = True
    error: str | None = None
    window_start: float | None = None
    entries: int = 0  # journal entries read
    orders: int = 0  # controller orders in the window
    checkpoints: int = 0  # checkpoints in the journal
    differences: list[Difference] = []


class ReconcileReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    ok: bool
    since: float | None
    checked_at: float
    differences: int
    gateways: list[GatewayReconcile]


def read_journal(link: GatewayLink, since: float | None, timeout: float) -> list[dict[str, Any]]:
    """The journal from `since` (oldest first). An agent from before `since` gets the
    plain request and is filtered here."""
    args: dict[str, Any] = {"limit": JOURNAL_LIMIT}
    if since is not None:
        args["since"] = since
    try:
        answer = link.call("journal", args, respect_backoff=True, timeout=timeout, lane="poll")
    except AgentError as exc:
        if since is None or exc.code != "bad_request":
            raise
        answer = link.call("journal", {"limit": JOURNAL_LIMIT}, respect_backoff=True,
                           timeout=timeout, lane="poll")
    entries = answer.get("entries") if isinstance(answer, dict) else None
    if not isinstance(entries, list):
        raise ControllerError(f"{link.gateway.name}: the journal answer holds no entries",
                              code="protocol_error")
    out = [e for e in entries if isinstance(e, dict)]
    if since is not None:
        out = [e for e in out if float(e.get("time") or 0.0) >= since]
    return out


def journal_checkpoint(entry: Mapping[str, Any]) -> SignedCheckpoint | None:
    """The signed checkpoint a journal entry carries (its fields may sit in the entry or
    in a `checkpoint` object; the checkpoint's own time as `checkpoint_time` when the
    entry's `time` is the journal's)."""
    data = entry.get("checkpoint") if isinstance(entry.get("checkpoint"), dict) else entry
    assert isinstance(data, Mapping)
    fields = dict(data)
    if "checkpoint_time" in fields:
        fields["time"] = fields["checkpoint_time"]
    try:
        return SignedCheckpoint.model_validate(fields)
    except ValidationError:
        return None


def reconcile_one(ctl: Controller, gw: Gateway, link: GatewayLink,
                  since: float | None) -> GatewayReconcile:
    try:
        entries = read_journal(link, since, ctl.config.poll.timeout_seconds)
    except ControllerError as exc:
        return GatewayReconcile(gateway=gw.name, ok=False, reachable=False,
                                error=f"cannot read the journal: {exc.message}")
    window_start = max(since or 0.0, gw.created_at)
    if len(entries) >= JOURNAL_LIMIT:
        window_start = max(window_start, float(entries[0].get("time") or 0.0))
    records = ctl.history(HistoryQuery(gateway=gw.name, since=window_start - SLACK,
                                       limit=HISTORY_LIMIT))
    orders = orders_for(gw.name, records)
    sent = [SentCheckpoint(seq=s.checkpoint.seq, head_hash=s.checkpoint.head_hash,
                           at=s.checkpoint.time, recorded=s.anchored.get(gw.name) == "recorded")
            for s in ctl.checkpoints.store.find(since_time=window_start)]
    chain: dict[int, str | None] = {}
    bad: list[int] = []
    journaled = [e for e in entries if e.get("action") == "checkpoint"]
    for entry in journaled:
        cp = journal_checkpoint(entry)
        if cp is None:
            continue
        if cp.key_id == ctl.checkpoints.key.key_id and \
                not signature_valid(cp, ctl.checkpoints.key.public_raw):
            bad.append(cp.seq)
        if cp.seq not in chain:
            rec = ctl.audit.get(cp.seq)
            chain[cp.seq] = rec.hash if rec is not None else None
    differences = compare(gw.name, orders, entries, window_start=window_start, sent=sent,
                          chain=chain, bad_signatures=bad)
    return GatewayReconcile(
        gateway=gw.name, ok=not differences, window_start=window_start, entries=len(entries),
        orders=sum(1 for o in orders.values() if o.at >= window_start),
        checkpoints=len(journaled), differences=differences)


def reconcile(ctl: Controller, gateways: Sequence[Gateway],
              since: float | None) -> ReconcileReport:
    # where each gateway's session is (as a replica: on its lease holder)
    results = ctl.on_holders(gateways, "reconcile.journal", {"since": since})
    out = [GatewayReconcile.model_validate(r) if isinstance(r, dict) else GatewayReconcile(
        gateway=g.name, ok=False, error="internal error (see the controller's log)")
        for g, r in zip(gateways, results, strict=True)]
    count = sum(len(r.differences) for r in out)
    return ReconcileReport(ok=all(r.ok for r in out), since=since, checked_at=ctl.clock(),
                           differences=count, gateways=out)
