"""Validated change requests, shared by the local CLI, the local socket and SSH RPC.

Whatever the entry point, a request is parsed into one of these models before
the engine sees it, so a hostile reason, actor or CIDR is refused in one place
with one message, and nothing is changed.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from agent.config import Direction, Name, Network, PortRange, Proto, check_ports_fit_proto
from agent.text import Reason

MAX_EXCEPTION_SECONDS = 30 * 24 * 3600
ACTOR_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:+-]{0,63}$")
TICKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._#/:-]{0,63}$")


def _actor(value: str) -> str:
    if not ACTOR_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid actor name (letters, digits, . _ @ : + -)")
    return value


def _ticket(value: str | None) -> str | None:
    if value is not None and not TICKET_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid ticket id")
    return value


Actor = Annotated[str, AfterValidator(_actor)]
Ticket = Annotated[str | None, AfterValidator(_ticket)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    actor: Actor = "local"
    ticket: Ticket = None


class IsolateRequest(_Request):
    profile: Name = "internet"
    reason: Reason


class RestoreRequest(_Request):
    reason: Reason


class AllowRequest(_Request):
    """An exception: one flow left open while isolated, until it expires by itself.

    Exact by construction: one remote network (never the whole internet), one
    protocol, explicit ports (ICMP has none: echo only), and `out` unless `in` or
    `both` is asked for. How wide the network may be is the gateway's config
    (`[exceptions]`) and, through the controller, the caller's role."""

    cidr: Network
    proto: Proto
    ports: tuple[PortRange, ...] = ()
    direction: Direction = "out"
    duration_seconds: int = Field(gt=0, le=MAX_EXCEPTION_SECONDS)
    reason: Reason

    @model_validator(mode="after")
    def _check(self) -> AllowRequest:
        check_ports_fit_proto(self.proto, self.ports)
        if self.proto != "icmp" and not self.ports:
            raise ValueError(f"{self.proto} exceptions need explicit ports (e.g. 443 or "
                             "8000-8100); an exception for every port is a restore in all "
                             "but name")
        if self.cidr.prefixlen == 0:
            raise ValueError(f"{self.cidr} is the whole internet: an exception names one "
                             "remote network (restore the gateway instead)")
        return self


ExceptionId = Annotated[str, Field(pattern=r"^[0-9a-f]{12}$")]


class ExtendRequest(_Request):
    """Give a live exception a new lifetime, counted from now."""

    id: ExceptionId
    duration_seconds: int = Field(gt=0, le=MAX_EXCEPTION_SECONDS)
    reason: Reason


class RevokeRequest(_Request):
    """Close a live exception now."""

    id: ExceptionId
    reason: Reason


class RenderRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: Name = "internet"


Op = Literal["ping", "status", "isolate", "restore", "allow", "exceptions", "extend", "revoke",
             "render", "probe", "journal", "checkpoint"]


def parse_duration(text: str) -> int:
    """'90s', '15m', '4h', '2d' or plain seconds, as whole seconds."""
    match = re.fullmatch(r"\s*(\d{1,7})\s*([smhd]?)\s*", text)
    if not match:
        raise ValueError(f"{text!r} is not a duration like 90s, 15m, 4h or 2d")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return int(match.group(1)) * unit
