"""`drawbridge allow ...`: exceptions, one exact flow through isolation until it
expires (open, list, extend, revoke).

Exit codes as for the other commands with fan-out (controller/cli_fanout.py); `allow
list`: 0 every gateway answered, 1 one did not.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table
from typer.core import TyperGroup

from controller.cli_common import (
    EXIT_FAILED,
    EXIT_INPUT,
    AllOpt,
    GroupOpt,
    JsonOpt,
    NamesArg,
    ReasonOpt,
    TicketOpt,
    call,
    fail,
    out,
    print_json,
    targets,
)
from controller.cli_fanout import finish, run_command


class OpenByDefault(TyperGroup):
    """`drawbridge allow GW --cidr ...` opens an exception (the `open` command) while
    `allow list|extend|revoke` are commands of their own: click has no default
    subcommand, so anything that is not one is handed to `open`."""

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:  # typer vendors click
        if args and args[0] not in self.commands:
            args = ["open", *args]
        return super().resolve_command(ctx, args)


allow_app = typer.Typer(
    cls=OpenByDefault, no_args_is_help=True, rich_markup_mode=None,
    help="Exceptions: one exact flow through isolation, until it expires (the kernel closes "
    "it). `drawbridge allow GW... --cidr C --proto tcp --port 443 --for 4h --reason R` opens "
    "one (the same as `allow open`).")


def _seconds(duration: str) -> int:
    from agent.requests import parse_duration

    try:
        return parse_duration(duration)
    except ValueError as exc:
        fail(f"--for: {exc}", EXIT_INPUT)


@allow_app.command("open")
def allow(
    cidr: Annotated[str, typer.Option(
        help="One remote network, e.g. 203.0.113.0/24 (operators: /24 or /48 at most).")],
    proto: Annotated[str, typer.Option(help="tcp, udp or icmp (echo).")],
    duration: Annotated[str, typer.Option("--for", help="Lifetime: 90s, 15m, 4h, 2d.")],
    reason: ReasonOpt,
    names: NamesArg = None,
    port: Annotated[list[str] | None, typer.Option(
        help="Port or range (repeatable; required for tcp and udp).")] = None,
    direction: Annotated[str, typer.Option(
        help="out: the inside opens connections to the network (default); in: the network "
        "opens connections to the inside; both.")] = "out",
    group: GroupOpt = None,
    all_: AllOpt = False,
    ticket: TicketOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Open one flow through isolation until it expires (the kernel closes it)."""
    ports: list[Any] = [int(p) if p.isdigit() else p for p in port or []]
    body = {"targets": targets(names, group, all_), "cidr": cidr, "proto": proto,
            "ports": ports, "direction": direction, "duration_seconds": _seconds(duration),
            "reason": reason, "ticket": ticket}
    finish(run_command("/v1/allow", body, as_json), as_json)


@allow_app.command("list")
def allow_list(
    names: Annotated[list[str], typer.Argument(help="Gateway names.")],
    as_json: JsonOpt = False,
) -> None:
    """The live exceptions of these gateways, with ids and remaining lifetime."""
    results = call("GET", "/v1/exceptions", gateway=names)
    if as_json:
        print_json(results)
    else:
        table = Table("gateway", "id", "flow", "direction", "left", "by", "reason")
        for r in results:
            if not r["ok"]:
                table.add_row(r["gateway"], "-", f"[red]{r['outcome']}[/]: {r['message']}",
                              "", "", "", "")
                continue
            for e in (r.get("result") or {}).get("exceptions", []):
                flow = e["flow"]
                ports = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in flow["ports"])
                table.add_row(r["gateway"], e["id"],
                              f"{flow['cidr']} {flow['proto']}/{ports or 'echo'}",
                              flow["direction"], f"{e['remaining_seconds']}s", e["actor"],
                              e["reason"])
        out.print(table)
    raise typer.Exit(0 if all(r["ok"] for r in results) else EXIT_FAILED)


@allow_app.command("extend")
def allow_extend(
    gateway: Annotated[str, typer.Argument(help="The gateway.")],
    exception_id: Annotated[str, typer.Argument(metavar="ID", help="From `allow list`.")],
    duration: Annotated[str, typer.Option("--for", help="New lifetime from now: 2h, 1d.")],
    reason: ReasonOpt,
    ticket: TicketOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Give one live exception a new lifetime, counted from now."""
    body = {"gateway": gateway, "id": exception_id, "duration_seconds": _seconds(duration),
            "reason": reason, "ticket": ticket}
    finish(call("POST", "/v1/allow/extend", body), as_json)


@allow_app.command("revoke")
def allow_revoke(
    gateway: Annotated[str, typer.Argument(help="The gateway.")],
    exception_id: Annotated[str, typer.Argument(metavar="ID", help="From `allow list`.")],
    reason: ReasonOpt,
    ticket: TicketOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Close one live exception now."""
    body = {"gateway": gateway, "id": exception_id, "reason": reason, "ticket": ticket}
    finish(call("POST", "/v1/allow/revoke", body), as_json)
