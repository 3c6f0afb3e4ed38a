"""A new replica joins the audit chain: where its head file starts.

Each replica holds the database to the head it wrote itself, in its own state dir
(controller/audit_head.py): a head file cannot be shared between hosts. A replica
that has never run against this database has no head yet, and the chain already has
records (the others wrote them). Such a replica, and only such a one (its replica id
is not in the `replicas` table, which keeps every id that ever ran), verifies the
whole chain with the key and starts its head at the chain's end; the join is then
recorded in the chain. A replica the database knows whose head file is missing is
not a join: the head guard raises its tamper alarm, as for one controller alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from controller.audit import AuditEvent, AuditLog
from controller.audit_head import Head, HeadFile

log = logging.getLogger("drawbridge.controller.replicas")


@dataclass(frozen=True)
class Joined:
    head: Head
    replica_id: str

    def event(self) -> AuditEvent:
        return AuditEvent(
            actor="controller", action="replica.joined", outcome="ok",
            reason=f"replica {self.replica_id} joined the audit chain at #{self.head.seq}",
            detail={"replica_id": self.replica_id,
                    "head": {"seq": self.head.seq, "hash": self.head.hash}})


def join_chain(audit: AuditLog, head_path: Path, *, replica_id: str,
               known: bool) -> Joined | None:
    """Start this replica's head at the chain's end if it is new and the chain holds
    (None: nothing to join, or not allowed to; the head guard then judges)."""
    head_file = HeadFile(head_path)
    if known or head_file.exists():
        return None
    last = audit.last_seq()
    if last == 0:
        return None  # a new chain: the head guard starts the head file itself
    problem = audit.verify_since(None)
    if problem is not None:
        log.error("replica %s cannot join the audit chain: %s", replica_id, problem)
        return None
    tail = audit.get(last)
    if tail is None:
        return None
    head = Head(tail.seq, tail.hash)
    head_file.write(head)
    log.info("replica %s joins the audit chain at #%d", replica_id, head.seq)
    return Joined(head=head, replica_id=replica_id)
