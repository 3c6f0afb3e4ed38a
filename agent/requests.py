"""Validated change requests, shared by the local CLI, the local socket and SSH RPC.

Whatever the entry point, a request is parsed into one of these models before
the engine sees it, so a hostile reason, actor or CIDR is refused in one place
with one message, and nothing is changed.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from agent.config import Name, Network, PortRange, check_ports_fit_proto
from agent.durations import parse_duration as parse_duration
from agent.nettypes import Direction, Proto
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


ConfirmWithin = Annotated[int | None, Field(ge=5, le=86400)]


class IsolateRequest(_Request):
    profile: Name = "internet"
    reason: Reason
    # commit-confirmed: returned to safety by the agent unless confirmed in time
    confirm_within_seconds: ConfirmWithin = None


class RestoreRequest(_Request):
    reason: Reason
    confirm_within_seconds: ConfirmWithin = None


class ConfirmRequest(_Request):
    """Confirm the provisional change in force (the one with this request id, if given)."""

    request_id: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")
    reason: Reason = "confirmed"


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
    confirm_within_seconds: ConfirmWithin = None

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
             "render", "probe", "journal", "checkpoint", "confirm"]
