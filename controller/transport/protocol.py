"""The agent's RPC protocol v1, as the controller speaks it (see agent/rpc.py).

Requests are built from validated models; responses are parsed leniently
(unknown fields are ignored, so a newer agent can add some) but strictly
enough that a garbled line is a protocol error, never a crash.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from controller.errors import TransportError

PROTOCOL_VERSION = 1
MAX_REQUEST_BYTES = 64 * 1024  # the agent refuses longer lines


class RpcRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    id: str = Field(max_length=64, pattern=r"^[A-Za-z0-9._:-]*$")
    op: str = Field(pattern=r"^[a-z_]{1,32}$")
    args: dict[str, Any] = Field(default_factory=dict)
    # the hash of the controller's audit record that ordered this request: the agent
    # journals it with the change (left out when there is none: older agents refuse it)
    audit: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    def encode(self) -> bytes:
        line = json.dumps(self.model_dump(exclude_none=True), separators=(",", ":"),
                          ensure_ascii=False)
        return line.encode("utf-8") + b"\n"


class RpcErrorBody(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    code: str = "internal"
    message: str = ""


class RpcResponse(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    v: int
    id: str = ""
    ok: bool
    result: Any = None
    error: RpcErrorBody | None = None


def decode_response(line: bytes, *, where: str) -> RpcResponse:
    try:
        resp = RpcResponse.model_validate_json(line)
    except ValidationError as exc:
        shown = line[:200].decode("utf-8", "replace")
        raise TransportError(
            f"{where}: the agent's answer is not a protocol v{PROTOCOL_VERSION} response "
            f"({exc.errors()[0]['msg']}): {shown!r}", code="protocol_error") from None
    if resp.v != PROTOCOL_VERSION:
        raise TransportError(f"{where}: the agent speaks protocol v{resp.v}, the controller "
                             f"v{PROTOCOL_VERSION}", code="protocol_error")
    return resp


# -- agent results (lenient: the controller keeps what it knows) -------------------------


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class AgentVerification(_Lenient):
    status: str = "unknown"
    checked_at: float | None = None
    failing: list[str] = Field(default_factory=list)
    detail: list[str] = Field(default_factory=list)


class AgentChange(_Lenient):
    action: str
    gateway: str
    state: str
    profile: str | None = None
    changed: bool = True
    in_sync: bool
    problems: list[str] = Field(default_factory=list)
    verification: AgentVerification = AgentVerification()
    apply_seconds: float = 0.0
    generation: int = 0
    note: str = ""


class AgentStatus(_Lenient):
    gateway: str
    state: str
    profile: str | None = None
    since: float = 0.0
    actor: str = ""
    reason: str = ""
    in_sync: bool
    problems: list[str] = Field(default_factory=list)
    verification: AgentVerification = AgentVerification()
    exceptions: list[dict[str, Any]] = Field(default_factory=list)
    generation: int = 0
    drift_repairs: int = 0
    agent_version: str = ""
    config_digest: str = ""
    provisional: dict[str, Any] | None = None  # a change awaiting confirmation
    profiles: list[str] | None = None  # None: an agent too old to say


class AgentPing(_Lenient):
    gateway: str
    protocol: int
