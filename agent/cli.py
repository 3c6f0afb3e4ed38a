"""`drawbridge-agent`: the agent's command line, on the gateway itself.

Every verb works with the daemon running (through its local socket) and
without it (break-glass on the console): both paths go through the same
dispatcher, the same validation and the same lock.

Exit codes: 0 ok; 1 failure; 2 bad input or config; 3 nft refused; 4 state
file problem; 5 busy; 6 applied but not verified.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from agent.cli_allow import allow_app
from agent.cli_config import config_app
from agent.cli_output import print_change, print_status, when
from agent.cli_support import (
    EXIT_UNVERIFIED,
    ConfirmOpt,
    Ctx,
    confirm_args,
    default_actor,
    err,
    fail,
    out,
    result_or_exit,
)
from agent.errors import DrawbridgeError
from agent.version import version_callback
from agent.wire import DEFAULT_CONFIG

app = typer.Typer(
    help="Drawbridge agent: isolate this gateway with nftables, restore it, prove it.",
    no_args_is_help=True, add_completion=False, rich_markup_mode=None,
)
app.add_typer(allow_app, name="allow")
app.add_typer(config_app, name="config")


@app.callback()
def main_options(
    ctx: typer.Context,
    config: Annotated[Path, typer.Option(
        "--config", "-c", envvar="DRAWBRIDGE_AGENT_CONFIG",
        help="Agent config (TOML).")] = DEFAULT_CONFIG,
    request_id: Annotated[str | None, typer.Option(
        "--request-id", help="Name this request (letters, digits, . _ : -): repeating a "
        "change with the same id applies it once and answers as the first time. Default: "
        "a fresh id per call.")] = None,
    timeout: Annotated[float, typer.Option(
        help="Seconds to wait for the agent daemon's answer.", min=0.1)] = 120.0,
    _version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=version_callback("drawbridge-agent"),
        help="Print the version and exit.")] = False,
) -> None:
    ctx.obj = Ctx(config, request_id, timeout)


@app.command()
def run(ctx: typer.Context, log_level: Annotated[str, typer.Option(
        help="debug, info, warning or error.")] = "info") -> None:
    """Run the daemon: reconcile loop, local socket, probes and metrics."""
    from agent.daemon import Daemon
    from agent.logs import setup_logging

    setup_logging(log_level)
    c: Ctx = ctx.obj
    from agent.config import load_config_and_digest

    try:
        config, digest = load_config_and_digest(c.config_path)
    except DrawbridgeError as exc:
        fail(str(exc), exc.exit_code)
    Daemon(config, config_path=c.config_path, config_digest=digest).run_forever()


@app.command()
def confirm(
    ctx: typer.Context,
    change: Annotated[str | None, typer.Argument(
        help="The request id of the change to confirm (default: whichever is pending).")]
    = None,
    reason: Annotated[str, typer.Option(help="Why (kept in the journal).")] = "confirmed",
    actor: Annotated[str | None, typer.Option(help="Who (default: USER@console).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
) -> None:
    """Make the provisional change in force final (commit-confirmed)."""
    args = {"request_id": change, "reason": reason, "actor": actor or default_actor()}
    print_change(result_or_exit(ctx.obj.call("confirm", args)), as_json)


@app.command()
def isolate(
    ctx: typer.Context,
    reason: Annotated[str, typer.Option(help="Why (kept in the journal).")],
    profile: Annotated[str, typer.Option(help="internet, full, or a profile from the config.")]
    = "internet",
    actor: Annotated[str | None, typer.Option(help="Who (default: USER@console).")] = None,
    ticket: Annotated[str | None, typer.Option(help="Ticket id.")] = None,
    confirm_within: ConfirmOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
) -> None:
    """Cut this gateway (and what is behind it) off the outside, in one transaction."""
    args = {"profile": profile, "reason": reason, "actor": actor or default_actor(),
            "ticket": ticket, **confirm_args(confirm_within)}
    print_change(result_or_exit(ctx.obj.call("isolate", args)), as_json)


@app.command()
def restore(
    ctx: typer.Context,
    reason: Annotated[str, typer.Option(help="Why (kept in the journal).")],
    actor: Annotated[str | None, typer.Option(help="Who (default: USER@console).")] = None,
    ticket: Annotated[str | None, typer.Option(help="Ticket id.")] = None,
    confirm_within: ConfirmOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
) -> None:
    """Remove Drawbridge's table: everything is as it was before isolation."""
    args = {"reason": reason, "actor": actor or default_actor(), "ticket": ticket,
            **confirm_args(confirm_within)}
    print_change(result_or_exit(ctx.obj.call("restore", args)), as_json)


@app.command()
def status(ctx: typer.Context, as_json: Annotated[bool, typer.Option(
        "--json", help="JSON output.")] = False) -> None:
    """Desired state, whether the kernel matches it, verification, live exceptions."""
    result = result_or_exit(ctx.obj.call("status", {}))
    if as_json:
        out.print_json(data=result)
    else:
        print_status(result)
    if result["state"] == "isolated" and (not result["in_sync"]
                                          or result["verification"]["status"] == "unverified"):
        raise typer.Exit(EXIT_UNVERIFIED)


@app.command()
def render(
    ctx: typer.Context,
    profile: Annotated[str, typer.Option(help="Profile to render.")] = "internet",
) -> None:
    """Print the nftables ruleset a profile would apply; applies nothing."""
    from agent.engine import Engine

    try:
        print(Engine(ctx.obj.config).render(profile), end="")
    except DrawbridgeError as exc:
        fail(str(exc), exc.exit_code)


@app.command()
def probe(ctx: typer.Context, as_json: Annotated[bool, typer.Option(
        "--json", help="JSON output.")] = False) -> None:
    """Run the configured probes now and compare with the expectation for the current state."""
    result = result_or_exit(ctx.obj.call("probe", {}))
    if as_json:
        out.print_json(data=result)
        return
    state = result.get("state", "?") + (f" (profile {result['profile']})"
                                        if result.get("profile") else "")
    table = Table("probe", "type", "target", "result", "detail", "expected", "ok", "ms",
                  title=f"probes, judged for the current state: {state}")
    for p in result.get("probes", []):
        table.add_row(p["name"], p["type"], p["target"], p["outcome"], p.get("detail", ""),
                      p["expected"], "yes" if p["ok"] else "NO",
                      f"{p['duration_seconds'] * 1000:.0f}")
    out.print(table)
    if result.get("note"):
        out.print(result["note"])
    if not all(p["ok"] for p in result.get("probes", [])):
        raise typer.Exit(EXIT_UNVERIFIED)


@app.command()
def journal(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(help="How many recent entries.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
) -> None:
    """Recent changes recorded on this gateway (append-only local journal)."""
    answer = result_or_exit(ctx.obj.call("journal", {"limit": limit}))
    entries = answer["entries"]
    if answer.get("skipped_lines"):
        err.print(f"note: {answer['skipped_lines']} unreadable journal line(s) skipped "
                  "(a line torn by a crash)", highlight=False)
    if as_json:
        out.print_json(data=entries)
        return
    table = Table("time", "action", "actor", "profile", "result", "reason")
    for e in entries:
        table.add_row(when(e.get("time")), e.get("action", ""), e.get("actor", ""),
                      str(e.get("profile") or "-"), e.get("result", ""), e.get("reason", ""))
    out.print(table)


@app.command()
def boot(ctx: typer.Context) -> None:
    """At boot, before any network is up: put back the isolation in force before the
    reboot (from the ruleset saved at the last apply when it matches the config, else
    from the config). Runs from drawbridge-agent-boot.service."""
    from agent.boot import boot as run_boot

    c: Ctx = ctx.obj
    raise typer.Exit(run_boot(c.config_path))


@app.command()
def rpc(ctx: typer.Context) -> None:
    """SSH forced command: JSON requests on stdin, one JSON response line each (relayed to
    the daemon; answered directly only when no daemon runs)."""
    from agent.relay import relay

    c: Ctx = ctx.obj
    raise typer.Exit(relay(c.config_path, sys.stdin.buffer, sys.stdout.buffer))


def main() -> None:
    app()
