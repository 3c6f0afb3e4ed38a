"""The agent's request protocol: newline-delimited JSON, one response line per request.

Spoken on the SSH forced command (`drawbridge-agent rpc`) and on the local
unix socket. Version 1:

    request  {"v": 1, "id": "c1", "op": "isolate", "args": {"profile": "internet", ...}}
    response {"v": 1, "id": "c1", "ok": true, "result": {...}}
             {"v": 1, "id": "c1", "ok": false, "error": {"code": "bad_request", "message": "..."}}

A malformed, oversize or unknown request gets an error response and changes
nothing; the channel stays open for the next line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.config import format_validation_error
from agent.engine import Engine
from agent.errors import DrawbridgeError
from agent.replay import RequestRef
from agent.requests import (
    AllowRequest,
    ConfirmRequest,
    ExtendRequest,
    IsolateRequest,
    Op,
    RenderRequest,
    RestoreRequest,
    RevokeRequest,
)
from agent.version import package_version
from agent.wire import MAX_LINE_BYTES, PROTOCOL_VERSION, encode, read_lines

log = logging.getLogger("drawbridge.rpc")


class Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1]
    # the request id: a change request with an id seen before gets the first answer
    id: str = Field(default="", max_length=64, pattern=r"^[A-Za-z0-9._:-]*$")
    op: Op
    args: dict[str, Any] = Field(default_factory=dict)
    # the hash of the controller's audit record that ordered this request (journaled)
    audit: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    def ref(self) -> RequestRef | None:
        return RequestRef.of(self.id, self.op, self.args, self.audit) if self.id else None


class JournalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    limit: int = Field(default=50, ge=1, le=10_000)
    since: float | None = None  # Unix time: only entries after it


class CheckpointRequest(BaseModel):
    """The controller's signed audit checkpoint, kept where its database admin cannot
    reach: appended to this gateway's journal, nothing else changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seq: int = Field(ge=1)
    head_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    time: float
    signature: str = Field(max_length=200, pattern=r"^[A-Za-z0-9+/=_-]+$")
    key_id: str = Field(max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")


# what a journal answer leaves out: the stored answers (large, and for replays only)
_PRIVATE_JOURNAL_FIELDS = ("answer", "request_digest")


class NoArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StatusRequest(BaseModel):
    """`elements: false` skips reading back set contents (cheap, for polls)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    elements: bool = True


def error_response(req_id: str, code: str, message: str) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": req_id, "ok": False,
            "error": {"code": code, "message": message}}


def ok_response(req_id: str, result: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": req_id, "ok": True, "result": result}


ProbeHandler = Callable[[], dict[str, Any]]


class Dispatcher:
    """Turns one request line into one response object. Never raises."""

    def __init__(self, engine: Engine, *, probe: ProbeHandler | None = None) -> None:
        self.engine = engine
        self.probe = probe

    def handle_line(self, line: bytes) -> dict[str, Any]:
        if len(line) > MAX_LINE_BYTES:
            return error_response("", "too_large",
                                  f"request is {len(line)} bytes; the limit is {MAX_LINE_BYTES}")
        try:
            raw = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return error_response("", "bad_json", f"request is not valid JSON: {exc}")
        req_id = raw.get("id", "") if isinstance(raw, dict) else ""
        req_id = req_id if isinstance(req_id, str) and len(req_id) <= 64 else ""
        if isinstance(raw, dict) and raw.get("v") not in (None, PROTOCOL_VERSION):
            return error_response(req_id, "unsupported_version",
                                  f"protocol version {raw.get('v')!r} is not supported; "
                                  f"this agent speaks v{PROTOCOL_VERSION}")
        try:
            env = Envelope.model_validate(raw)
        except ValidationError as exc:
            return error_response(req_id, "bad_request", format_validation_error(exc, "request"))
        try:
            return ok_response(env.id, self._dispatch(env))
        except ValidationError as exc:
            return error_response(env.id, "bad_request",
                                  format_validation_error(exc, f"{env.op} arguments"))
        except DrawbridgeError as exc:
            return error_response(env.id, exc.code, str(exc))
        except Exception as exc:  # the channel must survive anything one request does
            log.exception("request %s failed", env.op)
            return error_response(env.id, "internal", f"{type(exc).__name__}: {exc}")

    def _dispatch(self, env: Envelope) -> Any:
        engine, args = self.engine, env.args
        match env.op:
            case "ping":
                NoArgs.model_validate(args)
                return {"gateway": engine.config.gateway, "protocol": PROTOCOL_VERSION,
                        "version": package_version(), "config_digest": engine.config_digest,
                        "profiles": engine.config.profile_names()}
            case "status":
                elements = StatusRequest.model_validate(args).elements
                return engine.status(elements=elements).model_dump(mode="json")
            case "isolate":
                return engine.isolate(IsolateRequest.model_validate(args),
                                      env.ref()).model_dump(mode="json")
            case "restore":
                return engine.restore(RestoreRequest.model_validate(args),
                                      env.ref()).model_dump(mode="json")
            case "allow":
                return engine.allow(AllowRequest.model_validate(args),
                                    env.ref()).model_dump(mode="json")
            case "exceptions":
                NoArgs.model_validate(args)
                return {"gateway": engine.config.gateway,
                        "exceptions": engine.list_exceptions()}
            case "confirm":
                return engine.confirm(ConfirmRequest.model_validate(args),
                                      env.ref()).model_dump(mode="json")
            case "extend":
                return engine.extend(ExtendRequest.model_validate(args),
                                     env.ref()).model_dump(mode="json")
            case "revoke":
                return engine.revoke(RevokeRequest.model_validate(args),
                                     env.ref()).model_dump(mode="json")
            case "render":
                return {"ruleset": engine.render(RenderRequest.model_validate(args).profile)}
            case "journal":
                req = JournalRequest.model_validate(args)
                tail = engine.store.journal_log.tail(req.limit, since=req.since)
                entries = [{k: v for k, v in e.items() if k not in _PRIVATE_JOURNAL_FIELDS}
                           for e in tail.entries]
                return {"gateway": engine.config.gateway, "entries": entries,
                        "skipped_lines": tail.skipped}
            case "checkpoint":
                cp = CheckpointRequest.model_validate(args)
                engine.store.journal(action="checkpoint", actor="controller",
                                     reason="audit checkpoint", result="recorded", seq=cp.seq,
                                     head_hash=cp.head_hash, checkpoint_time=cp.time,
                                     signature=cp.signature, key_id=cp.key_id,
                                     **({"request_id": env.id} if env.id else {}))
                return {"gateway": engine.config.gateway, "recorded": True}
            case "probe":
                NoArgs.model_validate(args)
                if self.probe is None:
                    return {"probes": [], "note": "no probes configured"}
                return self.probe()
        raise AssertionError(f"unhandled op {env.op}")  # pragma: no cover - Op is closed


__all__ = ["MAX_LINE_BYTES", "PROTOCOL_VERSION", "Dispatcher", "encode", "read_lines"]
