"""The commands an operator gives: isolate, restore, allow (and extend or revoke an
exception), probe, and the live exceptions read. Each selects its targets, refuses bad
input before anything is sent, then takes the command path (controller/command_path.py).

A mixin of the Controller (controller/service.py): the attributes and methods it uses
are the Controller's, declared here for the type checker.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from controller.command_path import CommandPath, Emit, noop
from controller.errors import ControllerError, InputError
from controller.exceptions import check_breadth
from controller.fleet import GatewayResult
from controller.inventory import Gateway
from controller.schemas import CommandResult, Targets

if TYPE_CHECKING:
    from controller.auth import Principal


class Commands(CommandPath):
    """The command verbs of the Controller, on the command path."""

    if TYPE_CHECKING:
        def refused(self, principal: Principal | None, what: str, exc: ControllerError,
                    *, detail: dict[str, Any] | None = None,
                    source: str | None = None) -> None: ...

        def select(self, principal: Principal | None, targets: Targets,
                   what: str) -> list[Gateway]: ...

        def read(self, gateways: Sequence[Gateway], op: str, *, actor: str,
                 args: dict[str, Any] | None = None) -> list[GatewayResult]: ...

    def check_profile(self, principal: Principal, gateways: Sequence[Gateway],
                      profile: str) -> None:
        """Refuse a profile that a targeted gateway does not have (as its last status
        said) before anything is sent to any gateway: bad input, not a failed command."""
        missing = []
        for gw in gateways:
            known = self.states.get(gw.name).profiles
            if known is not None and profile not in known:
                missing.append(f"{gw.name} (it has: {', '.join(known)})")
        if missing:
            exc = InputError(f"unknown profile {profile!r} on {'; '.join(missing)}")
            self.refused(principal, "isolate", exc, detail={"profile": profile})
            raise exc

    def isolate(self, principal: Principal, targets: Targets, *, profile: str, reason: str,
                ticket: str | None, emit: Emit = noop) -> CommandResult:
        gateways = self.select(principal, targets, "isolate")
        self.check_profile(principal, gateways, profile)
        return self.run_command(
            gateways, action="isolate", op="isolate", actor=principal.user, reason=reason,
            ticket=ticket, args={"profile": profile}, emit=emit)

    def restore(self, principal: Principal, targets: Targets, *, reason: str,
                ticket: str | None, emit: Emit = noop) -> CommandResult:
        gateways = self.select(principal, targets, "restore")
        return self.run_command(gateways, action="restore", op="restore", actor=principal.user,
                                reason=reason, ticket=ticket, args={}, emit=emit)

    def allow(self, principal: Principal, targets: Targets, *, flow: dict[str, Any],
              reason: str, ticket: str | None, emit: Emit = noop) -> CommandResult:
        self.check_exception_breadth(principal, "allow", flow["cidr"])
        gateways = self.select(principal, targets, "allow")
        return self.run_command(gateways, action="allow", op="allow", actor=principal.user,
                                reason=reason, ticket=ticket, args=flow, emit=emit)

    def check_exception_breadth(self, principal: Principal, what: str, cidr: Any) -> None:
        try:
            check_breadth(ipaddress.ip_network(str(cidr)), principal, self.config.exceptions)
        except ControllerError as exc:
            self.refused(principal, what, exc, detail={"cidr": str(cidr)})
            raise

    def exceptions(self, principal: Principal, targets: Targets) -> list[GatewayResult]:
        """The live exceptions of each gateway, asked now (a read: not audited)."""
        gateways = self.select(principal, targets, "exceptions")
        return self.read(gateways, "exceptions", actor=principal.user)

    def change_exception(self, principal: Principal, op: str, *, gateway: str,
                         exception_id: str, reason: str, ticket: str | None,
                         duration_seconds: int | None = None) -> CommandResult:
        """`extend` or `revoke` one exception of one gateway. Extending is held to the
        same breadth rule as opening (the flow is read from the gateway first)."""
        gateways = self.select(principal, Targets(gateways=(gateway,)), op)
        args: dict[str, Any] = {"id": exception_id}
        if op == "extend":
            [listing] = self.read(gateways, "exceptions", actor=principal.user)
            live = {e["id"]: e for e in (listing.result or {}).get("exceptions", [])}
            if exception_id in live:
                self.check_exception_breadth(principal, op, live[exception_id]["flow"]["cidr"])
            args["duration_seconds"] = duration_seconds
        return self.run_command(gateways, action=op, op=op, actor=principal.user,
                                reason=reason, ticket=ticket, args=args)


    def probe(self, principal: Principal, targets: Targets, *, reason: str,
              emit: Emit = noop) -> CommandResult:
        gateways = self.select(principal, targets, "probe")
        return self.run_command(gateways, action="probe", op="probe", actor=principal.user,
                                reason=reason or "probe", ticket=None, args={}, emit=emit)

