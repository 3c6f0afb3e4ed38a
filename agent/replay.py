"""Exactly-once requests: a repeated request id gets the first answer, nothing is applied.

Every change request carries an id (the controller's command id; the agent's CLI
makes a fresh one per call). The journal records each change with its request id,
a digest of the request and the answer given; a request whose id is found there
is answered from the journal. The same id with a different request is refused:
an id names one request, and a retry must be that request.

The journal is the memory (not a separate file), so it survives restarts of the
agent, and the check runs under the agent's lock, so two copies of one request
arriving at once are still applied once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from agent.errors import ConflictError, DrawbridgeError, error_for_code
from agent.journal import Journal


@dataclass(frozen=True)
class RequestRef:
    """Who ordered a change: the request id, and the controller's audit record hash."""

    id: str
    digest: str
    audit: str | None = None

    @classmethod
    def of(cls, request_id: str, op: str, args: dict[str, Any],
           audit: str | None = None) -> RequestRef:
        body = json.dumps([op, args], sort_keys=True, separators=(",", ":"), default=str)
        return cls(request_id, hashlib.sha256(body.encode("utf-8")).hexdigest(), audit)

    def journal_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"request_id": self.id, "request_digest": self.digest}
        if self.audit:
            fields["audit"] = self.audit
        return fields


def ok_answer(result: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "result": result}


def error_answer(exc: DrawbridgeError) -> dict[str, Any]:
    return {"ok": False, "error": {"code": exc.code, "message": str(exc)}}


def replay(journal: Journal, ref: RequestRef | None) -> dict[str, Any] | None:
    """The first answer to `ref`'s request, if it was seen (raised again if it was an
    error); None if this request is new."""
    if ref is None:
        return None
    entry = journal.find_request(ref.id)
    if entry is None:
        return None
    if entry.get("request_digest") != ref.digest:
        raise ConflictError(f"request id {ref.id!r} was used for a different request "
                            f"({entry.get('action')} at {entry.get('time')}); "
                            "use a new id for a new request")
    answer = entry["answer"]
    if not answer.get("ok"):
        error = answer.get("error", {})
        raise error_for_code(str(error.get("code", "error")), str(error.get("message", "")))
    result = dict(answer["result"])
    result["replayed"] = True
    return result
