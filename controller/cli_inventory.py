"""`drawbridge gateway ...` and `drawbridge token ...`: the gateway inventory and API
tokens (admin).

Exit codes: 0 done; 2 bad input (unknown gateway, no pinned host key, ...); 3 not
authenticated or not allowed; 4 controller unreachable.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from controller.cli_common import (
    EXIT_INPUT,
    AuditReasonOpt,
    JsonOpt,
    TicketOpt,
    call,
    fail,
    out,
    print_json,
)

gateway_app = typer.Typer(help="The gateway inventory.", no_args_is_help=True,
                          rich_markup_mode=None)
token_app = typer.Typer(help="API tokens (admin).", no_args_is_help=True, rich_markup_mode=None)


@gateway_app.command("add")
def gateway_add(
    name: str,
    address: Annotated[str, typer.Option(help="HOST[:PORT] of the gateway's sshd.")],
    key: Annotated[str, typer.Option(help=(
        "Absolute path, on the controller's host, of the private key the controller service "
        "logs in with (restricted on the gateway to the agent's forced command). The "
        "service reads it; this command does not."))],
    reason: AuditReasonOpt,
    user: Annotated[str, typer.Option(help="SSH login.")] = "root",
    host_key: Annotated[str | None, typer.Option(help="Pinned host key, SHA256:...")] = None,
    trust_on_first_use: Annotated[bool, typer.Option(
        "--trust-on-first-use", help="No fingerprint: pin whatever key is seen first.")]
    = False,
    group: Annotated[list[str] | None, typer.Option(help="Group (repeatable).")] = None,
    ticket: TicketOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a gateway to the inventory, with its pinned SSH host key."""
    if host_key is None and not trust_on_first_use:
        fail("give --host-key SHA256:... (ssh-keygen -lf on the gateway's host key), or "
             "--trust-on-first-use to pin the first key seen", EXIT_INPUT)
    body = {"name": name, "address": address, "user": user,
            "key_path": key, "host_key": host_key,
            "trust_on_first_use": trust_on_first_use, "groups": group or [],
            "reason": reason, "ticket": ticket}
    view = call("POST", "/v1/gateways", body)
    if as_json:
        print_json(view)
    else:
        out.print(f"added {view['name']} ({view['address']}), host key "
                  f"{view['host_key'] or 'to be pinned on first use'}", highlight=False)


@gateway_app.command("update")
def gateway_update(
    name: str,
    reason: AuditReasonOpt,
    host_key: Annotated[str | None, typer.Option(
        help="Re-pin the host key, SHA256:... (the gateway was reinstalled or its key "
             "rotated; ssh-keygen -lf on the gateway's host key).")] = None,
    trust_on_first_use: Annotated[bool, typer.Option(
        "--trust-on-first-use", help="Forget the pinned key; pin whatever key is seen "
                                     "next.")] = False,
    key: Annotated[str | None, typer.Option(help=(
        "A new private key for the controller (absolute path on the controller's host): "
        "rotating the controller's key. Its public key must already be in the gateway's "
        "authorized_keys."))] = None,
    user: Annotated[str | None, typer.Option(help="A new SSH login.")] = None,
    address: Annotated[str | None, typer.Option(help="A new HOST[:PORT] of the sshd.")] = None,
    ticket: TicketOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Change how the controller reaches a gateway; its state and history stay. The session
    is reopened with the new settings."""
    body = {"host_key": host_key, "trust_on_first_use": trust_on_first_use, "key_path": key,
            "user": user, "address": address, "reason": reason, "ticket": ticket}
    view = call("PATCH", f"/v1/gateways/{name}", body)
    if as_json:
        print_json(view)
    else:
        out.print(f"updated {view['name']} ({view['address']}, user {view['user']}, key "
                  f"{view['key_path']}), host key "
                  f"{view['host_key'] or 'to be pinned on first use'}", highlight=False)


@gateway_app.command("list")
def gateway_list(as_json: JsonOpt = False) -> None:
    """The inventory."""
    views = call("GET", "/v1/gateways")
    if as_json:
        print_json(views)
        return
    table = Table("gateway", "address", "user", "groups", "host key", "key")
    for v in views:
        table.add_row(v["name"], v["address"], v["user"], ", ".join(v["groups"]) or "-",
                      v["host_key"] or "(first use)", v["key_path"])
    out.print(table)


@gateway_app.command("remove")
def gateway_remove(
    name: str,
    reason: AuditReasonOpt,
    ticket: TicketOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove a gateway from the inventory (its history stays)."""
    result = call("DELETE", f"/v1/gateways/{name}", {"reason": reason, "ticket": ticket})
    if as_json:
        print_json(result)
    else:
        out.print(f"removed {name}", highlight=False)


@token_app.command("create")
def token_create(
    user: Annotated[str, typer.Option(help="User name.")],
    role: Annotated[str, typer.Option(help="viewer, operator or admin.")],
    reason: AuditReasonOpt,
    description: Annotated[str, typer.Option(help="What it is for.")] = "",
) -> None:
    """Create an API token for a user (printed once)."""
    result = call("POST", "/v1/tokens", {"user": user, "role": role, "reason": reason,
                                         "description": description})
    print(result["token"])

