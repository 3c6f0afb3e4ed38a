"""`drawbridge-agent`: the agent's command line, on the gateway itself.

Every verb works with the daemon running (through its local socket) and
without it (break-glass on the console): both paths go through the same
dispatcher, the same validation and the same lock.

Exit codes: 0 ok; 1 failure; 2 bad input or config; 3 nft refused; 4 state
file problem; 5 busy; 6 applied but not verified.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from agent.config import AgentConfig, load_config
from agent.errors import DrawbridgeError
from agent.localsock import LocalClient
from agent.requests import parse_duration
from agent.rpc import Dispatcher
from agent.version import version_callback
from agent.wire import DEFAULT_CONFIG, SOCKET_FILE

EXIT_BY_CODE = {"bad_request": 2, "bad_json": 2, "too_large": 2, "config_error": 2,
                "unsupported_version": 2, "conflict": 2, "nft_error": 3, "state_error": 4,
                "busy": 5}
EXIT_UNVERIFIED = 6

app = typer.Typer(
    help="Drawbridge agent: isolate this gateway with nftables, restore it, prove it.",
    no_args_is_help=True, add_completion=False, rich_markup_mode=None,
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


class Ctx:
    def __init__(self, config_path: Path, request_id: str | None = None,
                 timeout: float = 120.0) -> None:
        self.config_path = config_path
        self.request_id = request_id
        self.timeout = timeout
        self._config: AgentConfig | None = None

    @property
    def config(self) -> AgentConfig:
        if self._config is None:
            try:
                self._config = load_config(self.config_path)
            except DrawbridgeError as exc:
                fail(str(exc), exc.exit_code)
        return self._config

    def dispatcher(self) -> Dispatcher:
        from agent.local import direct_dispatcher

        try:
            return direct_dispatcher(self.config_path)
        except DrawbridgeError as exc:
            fail(str(exc), exc.exit_code)

    def call(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """Through the daemon if it runs, else directly (break-glass). Each call is a
        request of its own (a fresh id, unless --request-id names one to repeat). Only
        a daemon that is provably not running (no socket, connection refused) sends the
        request down the direct path: a daemon that stops answering may have applied
        it, and the same request must never be applied twice."""
        request_id = self.request_id or f"cli-{uuid.uuid4().hex[:16]}"
        request = {"v": 1, "id": request_id, "op": op, "args": args}
        try:
            client = LocalClient.connect(self.config.state_dir / SOCKET_FILE, self.timeout)
        except OSError as exc:
            fail(f"cannot reach the agent daemon's socket: {exc.strerror or exc}", 1)
        if client is None:
            return self.dispatcher().handle_line(json.dumps(request).encode("utf-8"))
        try:
            return client.call(request)
        except (ConnectionError, OSError) as exc:
            fail(f"the agent daemon did not answer ({exc}); the request may have been "
                 f"applied. See `drawbridge-agent journal`, or repeat it safely with "
                 f"--request-id {request_id}", 1)
        finally:
            client.close()


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def default_actor() -> str:
    user = os.environ.get("SUDO_USER") or getpass.getuser() or "root"
    return f"{user}@console"


def result_or_exit(response: dict[str, Any]) -> dict[str, Any]:
    if not response.get("ok"):
        error = response.get("error", {})
        fail(error.get("message", "unknown error"), EXIT_BY_CODE.get(error.get("code", ""), 1))
    result = response["result"]
    assert isinstance(result, dict)
    return result


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def print_change(result: dict[str, Any], as_json: bool) -> None:
    verification = result["verification"]
    if as_json:
        out.print_json(data=result)
    else:
        profile = f" (profile {result['profile']})" if result.get("profile") else ""
        out.print(f"{result['gateway']}: {result['state']}{profile}; "
                  f"applied in {result['apply_seconds'] * 1000:.0f} ms; "
                  f"read-back {'matches' if result['in_sync'] else 'DIFFERS'}; "
                  f"{verification['status']}", highlight=False)
        for problem in result.get("problems", []):
            out.print(f"  ! {problem}", highlight=False)
        for line in verification.get("detail", []) or [
                f"failing: {name}" for name in verification.get("failing", [])]:
            out.print(f"  ! {line}", highlight=False)
        if result.get("note"):
            out.print(f"  note: {result['note']}", highlight=False)
    if not result["in_sync"] or verification["status"] == "unverified":
        raise typer.Exit(EXIT_UNVERIFIED)


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
    Daemon(c.config).run_forever()


@app.command()
def isolate(
    ctx: typer.Context,
    reason: Annotated[str, typer.Option(help="Why (kept in the journal).")],
    profile: Annotated[str, typer.Option(help="internet, full, or a profile from the config.")]
    = "internet",
    actor: Annotated[str | None, typer.Option(help="Who (default: USER@console).")] = None,
    ticket: Annotated[str | None, typer.Option(help="Ticket id.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
) -> None:
    """Cut this gateway (and what is behind it) off the outside, in one transaction."""
    args = {"profile": profile, "reason": reason, "actor": actor or default_actor(),
            "ticket": ticket}
    print_change(result_or_exit(ctx.obj.call("isolate", args)), as_json)


@app.command()
def restore(
    ctx: typer.Context,
    reason: Annotated[str, typer.Option(help="Why (kept in the journal).")],
    actor: Annotated[str | None, typer.Option(help="Who (default: USER@console).")] = None,
    ticket: Annotated[str | None, typer.Option(help="Ticket id.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
) -> None:
    """Remove Drawbridge's table: everything is as it was before isolation."""
    args = {"reason": reason, "actor": actor or default_actor(), "ticket": ticket}
    print_change(result_or_exit(ctx.obj.call("restore", args)), as_json)


allow_app = typer.Typer(
    help="Exceptions: open one exact flow while isolated, until it expires by itself. "
    "Without a subcommand, opens one (--cidr, --proto, --port, --for, --reason).",
    rich_markup_mode=None,
)
app.add_typer(allow_app, name="allow")
ActorOpt = Annotated[str | None, typer.Option(help="Who (default: USER@console).")]
TicketOpt = Annotated[str | None, typer.Option(help="Ticket id.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="JSON output.")]


def _seconds(duration: str) -> int:
    try:
        return parse_duration(duration)
    except ValueError as exc:
        fail(f"--for: {exc}", 2)


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
            "duration_seconds": _seconds(duration), "reason": reason,
            "actor": actor or default_actor(), "ticket": ticket}
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
        table.add_row(e["id"], _flow_text(e["flow"]), e["flow"]["direction"],
                      _when(e["expires_at"]), f"{e['remaining_seconds']}s", e["actor"],
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
    args = {"id": exception_id, "duration_seconds": _seconds(duration), "reason": reason,
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


def _flow_text(flow: dict[str, Any]) -> str:
    ports = ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in flow["ports"]) or "echo"
    return f"{flow['cidr']} {flow['proto']}/{ports}"


@app.command()
def status(ctx: typer.Context, as_json: Annotated[bool, typer.Option(
        "--json", help="JSON output.")] = False) -> None:
    """Desired state, whether the kernel matches it, verification, live exceptions."""
    result = result_or_exit(ctx.obj.call("status", {}))
    if as_json:
        out.print_json(data=result)
    else:
        _print_status(result)
    if result["state"] == "isolated" and (not result["in_sync"]
                                          or result["verification"]["status"] == "unverified"):
        raise typer.Exit(EXIT_UNVERIFIED)


def _print_status(s: dict[str, Any]) -> None:
    v = s["verification"]
    table = Table(show_header=False, box=None)
    table.add_row("gateway", s["gateway"])
    table.add_row("state", s["state"] + (f" (profile {s['profile']})" if s["profile"] else ""))
    table.add_row("since", f"{_when(s['since'])} by {s['actor']}: {s['reason']}")
    table.add_row("kernel", "matches desired state" if s["in_sync"] else "DIFFERS")
    for problem in s["problems"]:
        table.add_row("", f"! {problem}")
    table.add_row("verification", v["status"] + (f" at {_when(v['checked_at'])}"
                                                  if v.get("checked_at") else ""))
    for line in v.get("detail", []) or [f"failing: {n}" for n in v.get("failing", [])]:
        table.add_row("", f"! {line}")
    for line in s.get("bypass", []):
        table.add_row("", f"! bypass: {line}")
    for exc in s["exceptions"]:
        flow = exc["flow"]
        table.add_row("exception", f"{exc['id']} {_flow_text(flow)} {flow['direction']} "
                      f"until {_when(exc['expires_at'])} ({exc['actor']}: {exc['reason']})")
    out.print(table)


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
        table.add_row(_when(e.get("time")), e.get("action", ""), e.get("actor", ""),
                      str(e.get("profile") or "-"), e.get("result", ""), e.get("reason", ""))
    out.print(table)


@app.command()
def rpc(ctx: typer.Context) -> None:
    """SSH forced command: JSON requests on stdin, one JSON response line each (relayed to
    the daemon; answered directly only when no daemon runs)."""
    from agent.relay import relay

    c: Ctx = ctx.obj
    raise typer.Exit(relay(c.config_path, sys.stdin.buffer, sys.stdout.buffer))


def main() -> None:
    app()
