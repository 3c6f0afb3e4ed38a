"""`drawbridge-agent allow` (and `allow list|extend|revoke`): exceptions on this gateway."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from agent.cli_output import flow_text, print_change, when
from agent.cli_support import (
    ActorOpt,
    ConfirmOpt,
    JsonOpt,
    TicketOpt,
    confirm_args,
    default_actor,
    fail,
    out,
    result_or_exit,
    seconds,
)

allow_app = typer.Typer(
    help="Exceptions: open one exact flow while isolated, until it expires by itself. "
    "Without a subcommand, opens one (--cidr, --proto, --port, --for, --reason).",
    rich_markup_mode=None,
)


@allow_app.callback(invoke_without_command=True)
def allow(
    ctx: typer.Context,
    cidr: Annotated[str | None, typer.Option(help="One remote network, e.g. 203.0.113.0/24.")]
    = None,
    proto: Annotated[str | None, typer.Option(help="tcp, udp or icmp (echo).")] = None,
    reason: Annotated[str | None, typer.Option(help="Why (kept in the journal).")] = None,
    duration: Annotated[str | None, typer.Option("--for", help="Lifetime: 90s, 15m, 4h, 2d.")]
    = None,
    port: Annotated[list[str] | None, typer.Option(
        help="Port or range (repeatable; required for tcp and udp).")] = None,
    direction: Annotated[str, typer.Option(
        help="out: inside/gateway to the network (default); in: the network to the inside; "
        "both.")] = "out",
    actor: ActorOpt = None,
    ticket: TicketOpt = None,
    confirm_within: ConfirmOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Open one flow while isolated; the kernel closes it at expiry, agent or not."""
    if ctx.invoked_subcommand is not None:
        return
    missing = [name for name, value in (("--cidr", cidr), ("--proto", proto),
                                        ("--for", duration), ("--reason", reason))
               if value is None]
    if missing:
        fail(f"allow needs {', '.join(missing)} (or a subcommand: list, extend, revoke)", 2)
    assert duration is not None
    ports: list[Any] = [int(p) if p.isdigit() else p for p in port or []]
    args = {"cidr": cidr, "proto": proto, "ports": ports, "direction": direction,
            "duration_seconds": seconds(duration), "reason": reason,
            "actor": actor or default_actor(), "ticket": ticket, **confirm_args(confirm_within)}
    print_change(result_or_exit(ctx.obj.call("allow", args)), as_json)


@allow_app.command("list")
def allow_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """The live exceptions, with their ids and remaining lifetime."""
    result = result_or_exit(ctx.obj.call("exceptions", {}))
    if as_json:
        out.print_json(data=result)
        return
    table = Table("id", "flow", "direction", "until", "left", "by", "reason")
    for e in result["exceptions"]:
        table.add_row(e["id"], flow_text(e["flow"]), e["flow"]["direction"],
                      when(e["expires_at"]), f"{e['remaining_seconds']}s", e["actor"],
                      e["reason"])
    out.print(table)


@allow_app.command("extend")
def allow_extend(
    ctx: typer.Context,
    exception_id: Annotated[str, typer.Argument(metavar="ID", help="From `allow list`.")],
    duration: Annotated[str, typer.Option("--for", help="New lifetime from now: 2h, 1d.")],
    reason: Annotated[str, typer.Option(help="Why (kept in the journal).")],
    actor: ActorOpt = None,
    ticket: TicketOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Give a live exception a new lifetime, counted from now."""
    args = {"id": exception_id, "duration_seconds": seconds(duration), "reason": reason,
            "actor": actor or default_actor(), "ticket": ticket}
    print_change(result_or_exit(ctx.obj.call("extend", args)), as_json)


@allow_app.command("revoke")
def allow_revoke(
    ctx: typer.Context,
    exception_id: Annotated[str, typer.Argument(metavar="ID", help="From `allow list`.")],
    reason: Annotated[str, typer.Option(help="Why (kept in the journal).")],
    actor: ActorOpt = None,
    ticket: TicketOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Close a live exception now."""
    args = {"id": exception_id, "reason": reason, "actor": actor or default_actor(),
            "ticket": ticket}
    print_change(result_or_exit(ctx.obj.call("revoke", args)), as_json)


