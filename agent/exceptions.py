"""Exceptions (`allow`): what may be opened, pure checks and the element changes.

An exception is one exact flow with a lifetime. It is refused, with a message
that says why and nothing changed, when it is wider than this gateway allows
(`[exceptions]` in the config), overlaps a live exception (extend that one
instead: overlapping elements would make revoking one revoke part of another),
or the gateway is open (there is nothing to except; an exception recorded while
open would be carried silently into the next isolation).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from agent.config import AgentConfig, FlowRule
from agent.errors import InputError
from agent.nft.render import ElementChange
from agent.policy import exception_elements, flows_overlap, remaining_seconds
from agent.state import DesiredState, ExceptionEntry


def check_allowed(config: AgentConfig, flow: FlowRule, duration: int) -> None:
    """Refuse a flow wider or longer than this gateway's limits."""
    limits = config.exceptions
    widest = limits.widest_prefix_v4 if flow.cidr.version == 4 else limits.widest_prefix_v6
    if flow.cidr.prefixlen < widest:
        raise InputError(f"{flow.cidr} is wider than this gateway allows for an exception "
                         f"(/{widest} at most for IPv{flow.cidr.version}; "
                         "[exceptions] in the agent config)")
    if duration > limits.max_seconds:
        raise InputError(f"an exception lasts at most {limits.max_seconds}s on this gateway "
                         f"(asked: {duration}s)")


def check_no_overlap(flow: FlowRule, live: Iterable[ExceptionEntry]) -> None:
    clashes = [e for e in live if flows_overlap(e.flow, flow)]
    if clashes:
        ids = ", ".join(e.id for e in clashes)
        raise InputError(f"the exception overlaps live exception {ids}; extend or revoke "
                         "that one instead")


def check_isolated(state: DesiredState, verb: str) -> None:
    if not state.isolated:
        raise InputError(f"the gateway is open: there is nothing to {verb} (isolate it first)")


def find(state: DesiredState, exception_id: str, now: float) -> ExceptionEntry:
    for entry in state.live_exceptions(now):
        if entry.id == exception_id:
            return entry
    raise InputError(f"no live exception {exception_id!r} on this gateway "
                     "(see `allow list`; it may have expired)")


def element_changes(entry: ExceptionEntry, now: float) -> list[ElementChange]:
    """The kernel elements of `entry` with its remaining lifetime."""
    left = remaining_seconds(entry.expires_at, now)
    return [(name, el) for name, els in exception_elements(entry.flow, left).items()
            for el in els]


def listing(entries: Sequence[ExceptionEntry], now: float) -> list[dict[str, object]]:
    """Live exceptions as the `exceptions` request answers them."""
    return [{**e.model_dump(mode="json"), "remaining_seconds": remaining_seconds(e.expires_at, now)}
            for e in entries]
