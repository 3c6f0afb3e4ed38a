"""Work on a gateway's SSH session that is not one agent request: run where the
session is.

Alone, a controller runs such work on its own links. As a replica it may not: only
the holder of a gateway's lease talks to it. So each piece of work has a name, every
replica knows the same names (this table), and a replica asking for it queues a row
with the name and JSON arguments; the holder runs the function on its link and
stores its JSON answer (controller/replicas.py). The answers come back in the order
of the gateways; None where the work raised or could not be done.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from controller.inventory import Gateway
from controller.transport.link import GatewayLink

if TYPE_CHECKING:
    from controller.service import Controller

Procedure = Callable[[Gateway, GatewayLink, dict[str, Any]], Any]


def procedures(ctl: Controller) -> dict[str, Procedure]:
    """Name -> what the holder runs (the answer must be JSON)."""
    from controller.reconcile import reconcile_one

    def poll(gw: Gateway, link: GatewayLink, args: dict[str, Any]) -> Any:
        return ctl.polls.poll_one(gw, link)

    def checkpoint(gw: Gateway, link: GatewayLink, args: dict[str, Any]) -> Any:
        return ctl.checkpoints.send_one(link, args)

    def journal(gw: Gateway, link: GatewayLink, args: dict[str, Any]) -> Any:
        return reconcile_one(ctl, gw, link, args.get("since")).model_dump(mode="json")

    return {"poll": poll, "checkpoint.send": checkpoint, "reconcile.journal": journal}
