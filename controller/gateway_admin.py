"""The inventory's changes (`gateway add|update|remove`): checked, audited, refused.

A mixin of the Controller (controller/service.py): the attributes and methods it uses
are the Controller's, declared here for the type checker.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from controller.audit import AuditEvent, AuditRecord
from controller.errors import ConfigError, ControllerError, InputError
from controller.fleet import GatewayResult
from controller.inventory import Gateway, Inventory, parse_address, require_absolute_key
from controller.transport.ssh import load_private_key

if TYPE_CHECKING:
    from controller.auth import Principal
    from controller.replicas import Replicas
    from controller.states import StateStore
    from controller.transport.link import LinkRegistry


def _check_key(name: str, key_path: str) -> None:
    """The controller's private key for a gateway: an absolute path that it can load."""
    require_absolute_key(name, key_path)
    try:
        load_private_key(key_path)
    except ConfigError as exc:
        raise InputError(exc.message) from None


class GatewayAdmin:
    """`add_gateway`, `update_gateway`, `remove_gateway` of the Controller."""

    inventory: Inventory
    states: StateStore
    links: LinkRegistry
    replicas: Replicas | None

    if TYPE_CHECKING:
        def record(self, event: AuditEvent) -> AuditRecord: ...

        def refused(self, principal: Principal | None, what: str, exc: ControllerError,
                    *, detail: dict[str, Any] | None = None,
                    source: str | None = None) -> None: ...

    @contextlib.contextmanager
    def _inventory_change(self, principal: Principal, request: str, name: str
                          ) -> Iterator[None]:
        """Bad input to an inventory change is refused, audited, and changes nothing."""
        try:
            yield
        except ValidationError as exc:
            err = InputError(f"invalid gateway: {exc.errors()[0]['msg']}")
            self.refused(principal, request, err, detail={"gateway": name})
            raise err from None
        except ControllerError as exc:
            self.refused(principal, request, exc, detail={"gateway": name})
            raise

    def add_gateway(self, principal: Principal, *, name: str, address: str, user: str,
                    key_path: str, host_key: str | None, trust_on_first_use: bool,
                    groups: Sequence[str], reason: str, ticket: str | None) -> Gateway:
        with self._inventory_change(principal, "gateway.add", name):
            host, port = parse_address(address)
            _check_key(name, key_path)
            gw = Gateway(name=name, host=host, port=port, user=user, key_path=key_path,
                         host_key=host_key, trust_on_first_use=trust_on_first_use,
                         groups=tuple(groups), created_by=principal.user)
            gw = self.inventory.add(gw)
        self.states.delete(name)  # a re-added name starts with a clean slate
        if self.replicas is not None and self.replicas.started:
            self.replicas.tick()  # a new gateway gets its holder now, not at the next tick
        self.record(AuditEvent(
            actor=principal.user, action="gateway.add", outcome="ok", reason=reason,
            ticket=ticket, targets=(name,),
            detail={"address": gw.address, "user": gw.user, "key_path": gw.key_path,
                    "host_key": gw.host_key, "trust_on_first_use": gw.trust_on_first_use,
                    "groups": list(gw.groups)}))
        return gw

    def update_gateway(self, principal: Principal, name: str, *, reason: str,
                       ticket: str | None, address: str | None = None,
                       user: str | None = None, key_path: str | None = None,
                       host_key: str | None = None, trust_on_first_use: bool = False
                       ) -> Gateway:
        """Re-pin a host key (the gateway was reinstalled, or its key rotated), rotate the
        controller's key, follow a moved sshd: audited, and the session is reopened with
        the new settings. State, pending change and history stay."""
        changes: dict[str, object] = {}
        with self._inventory_change(principal, "gateway.update", name):
            if host_key is not None and trust_on_first_use:
                raise InputError("give --host-key or --trust-on-first-use, not both")
            if address is not None:
                changes["host"], changes["port"] = parse_address(address)
            if user is not None:
                changes["user"] = user
            if key_path is not None:
                _check_key(name, key_path)
                changes["key_path"] = key_path
            if host_key is not None or trust_on_first_use:
                changes.update(host_key=host_key, trust_on_first_use=trust_on_first_use)
            if not changes:
                raise InputError("nothing to change: give --host-key, --trust-on-first-use, "
                                 "--key, --user or --address")
            before, after = self.inventory.update(name, **changes)
        self.links.remove(name)  # the next request connects with the new settings
        old, new = before.model_dump(), after.model_dump()
        fields = ("host", "port", "user", "key_path", "host_key", "trust_on_first_use")
        self.record(AuditEvent(
            actor=principal.user, action="gateway.update", outcome="ok", reason=reason,
            ticket=ticket, targets=(name,),
            detail={"changed": {f: [old[f], new[f]] for f in fields if old[f] != new[f]}}))
        return after

    def remove_gateway(self, principal: Principal, name: str, *, reason: str,
                       ticket: str | None) -> Gateway:
        try:
            gw = self.inventory.remove(name)
        except ControllerError as exc:
            self.refused(principal, "gateway.remove", exc, detail={"gateway": name})
            raise
        last = self.states.get(name)
        self.states.delete(name)
        self.links.remove(name)
        if self.replicas is not None:  # nobody will hold it: what it was owed is void
            self.replicas.queue.drop(name, GatewayResult(
                gateway=name, op="?", outcome="failed", ok=False, error_code="not_found",
                message=f"{name} was removed from the inventory").model_dump(mode="json"))
        self.record(AuditEvent(
            actor=principal.user, action="gateway.remove", outcome="ok", reason=reason,
            ticket=ticket, targets=(name,),
            detail={"address": gw.address, "last_state": last.state,
                    "last_profile": last.profile,
                    "dropped_pending": last.pending.command_id if last.pending else None}))
        return gw
