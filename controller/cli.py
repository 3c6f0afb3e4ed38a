"""`drawbridge`: the engineer's command line against the controller's API.

The commands with fan-out (isolate, restore, allow, probe) and the reads (status,
history, report, whoami) are here; the command groups are modules of their own:
`gateway` and `token` (controller/cli_inventory.py), `audit` (controller/cli_audit.py),
`plan` (controller/cli_plans.py).

Environment: DRAWBRIDGE_URL (default http://127.0.0.1:8630), DRAWBRIDGE_TOKEN.

Exit codes: 0 every gateway applied (and verified where there is something to
verify); 1 at least one gateway failed, was unreachable or refused; 2 bad
input (unknown gateway, invalid reason, ...); 3 not authenticated or not
allowed; 4 controller unreachable or internal error; 6 applied but not
verified on at least one gateway (and none failed).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, NoReturn

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperGroup

from agent.version import version_callback
from controller.cli_audit import audit_app
from controller.cli_common import (
    EXIT_CONTROLLER,
    EXIT_FAILED,
    EXIT_INPUT,
    EXIT_UNVERIFIED,
    AllOpt,
    GroupOpt,
    JsonOpt,
    NamesArg,
    ReasonOpt,
    TicketOpt,
    call,
    client,
    err,
    exit_code_for,
    fail,
    out,
    print_json,
    targets,
    when,
)
from controller.cli_inventory import gateway_app, token_app
from controller.cli_plans import plan_app, restore_with_plan
from controller.client import ClientError

HELP = """Drawbridge: isolate and restore gateways fleet-wide, with proof.

\b
Where and who (environment):
  DRAWBRIDGE_URL    the controller's API (default http://127.0.0.1:8630)
  DRAWBRIDGE_TOKEN  your API token (an admin makes one: drawbridge token create)

\b
Exit codes: 0 done (and verified); 1 a gateway failed or was unreachable;
2 bad input; 3 no token or not allowed; 4 controller unreachable or error;
6 applied but not verified; 7 a restore plan waits for a person.
"""

app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False, rich_markup_mode=None)
app.add_typer(gateway_app, name="gateway")
app.add_typer(audit_app, name="audit")
app.add_typer(token_app, name="token")
app.add_typer(plan_app, name="plan")


@app.callback()
def main_options(_version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=version_callback("drawbridge"),
        help="Print the version and exit.")] = False) -> None:
    pass  # the options every command shares; the help is the app's (HELP)

# -- commands with fan-out ---------------------------------------------------------------

OUTCOME_STYLE = MappingProxyType({
    "verified": "green", "applied": "green", "unverified": "yellow", "failed": "red",
    "unreachable": "red", "refused": "bold red"})


def run_command(path: str, body: dict[str, Any], as_json: bool) -> dict[str, Any]:
    """POST a command, streaming per-gateway results into a progress bar."""
    api = client()
    final: dict[str, Any] | None = None
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=err, transient=True,
                        disable=as_json or not err.is_terminal)
    task = None
    try:
        with progress:
            for event in api.stream(path, body):
                kind = event.get("event")
                if kind == "accepted":
                    label = f"{event.get('action', '')} {event.get('total', 0)} gateway(s)"
                    if task is not None:
                        progress.remove_task(task)
                    task = progress.add_task(label, total=event.get("total", 0))
                elif kind == "stage" and not as_json:
                    progress.console.print(f"stage [bold]{event['name']}[/]: {event['action']}"
                                           + (f" (profile {event['profile']})"
                                              if event.get("profile") else "")
                                           + f" on {', '.join(event['gateways'])}",
                                           highlight=False)
                elif kind == "result" and task is not None:
                    progress.advance(task)
                elif kind == "done":
                    final = event["result"]
                elif kind == "error":
                    error = event.get("error", {})
                    fail(error.get("message", "the command failed"), EXIT_CONTROLLER)
    except ClientError as exc:
        fail(str(exc), exit_code_for(exc))
    finally:
        api.close()
    if final is None:
        fail("the controller ended the command stream without a result; see "
             "'drawbridge history'", EXIT_CONTROLLER)
    return final


def results_table(cmd: dict[str, Any]) -> Table:
    table = Table("gateway", "result", "state", "profile", "verification", "ms", "detail",
                  title=f"{cmd['action']} {cmd['command_id']}" + (
                      f" - stage {cmd['stage']}" if cmd.get("stage") else ""))
    for r in cmd["results"]:
        style = OUTCOME_STYLE.get(r["outcome"], "")
        table.add_row(r["gateway"], f"[{style}]{r['outcome']}[/]" if style else r["outcome"],
                      r.get("state") or "-", r.get("profile") or "-",
                      r.get("verification") or "-", f"{r['duration_seconds'] * 1000:.0f}",
                      r.get("message") or "")
    return table


def command_exit(commands: list[dict[str, Any]], stopped: bool = False) -> int:
    outcomes = [r["outcome"] for c in commands for r in c["results"]]
    if stopped or any(o in ("failed", "unreachable", "refused") for o in outcomes):
        return EXIT_FAILED
    if any(o == "unverified" for o in outcomes):
        return EXIT_UNVERIFIED
    return 0


def finish(result: dict[str, Any], as_json: bool) -> NoReturn:
    if as_json:
        print_json(result)
    else:
        out.print(results_table(result))
        counts = ", ".join(f"{v} {k}" for k, v in sorted(result["counts"].items()))
        out.print(f"{len(result['results'])} gateway(s) in {result['duration_seconds']:.2f}s: "
                  f"{counts}", highlight=False)
        retry = [r["gateway"] for r in result["results"] if r.get("will_retry")]
        if retry:
            out.print(f"pending, retried when they answer again: {', '.join(retry)}",
                      highlight=False)
    raise typer.Exit(command_exit([result]))


@app.command()
def isolate(
    reason: ReasonOpt,
    names: NamesArg = None,
    group: GroupOpt = None,
    all_: AllOpt = False,
    profile: Annotated[str, typer.Option(help="internet, full, or a profile the agents know.")]
    = "internet",
    ticket: TicketOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cut gateways (and what is behind them) off the outside."""
    body = {"targets": targets(names, group, all_), "profile": profile, "reason": reason,
            "ticket": ticket}
    finish(run_command("/v1/isolate", body, as_json), as_json)


@app.command()
def restore(
    reason: ReasonOpt,
    names: NamesArg = None,
    group: GroupOpt = None,
    all_: AllOpt = False,
    plan: Annotated[Path | None, typer.Option(
        help="Restore plan (TOML): stages. Starts the plan in the controller (as `plan "
        "start`) and follows it until it is done, fails, or waits for a person.")] = None,
    from_stage: Annotated[str | None, typer.Option("--from", help="Start at this stage.")]
    = None,
    through: Annotated[str | None, typer.Option(help="Stop after this stage.")] = None,
    ticket: TicketOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Bring gateways back: fully, or stage by stage with --plan (exit 7: the plan waits
    for an approval or was paused; it carries on in the controller)."""
    body: dict[str, Any] = {"targets": targets(names, group, all_), "reason": reason,
                            "ticket": ticket}
    if plan is not None:
        restore_with_plan(plan, body, from_stage=from_stage, through=through,
                          as_json=as_json)
    if from_stage or through:
        fail("--from and --through need --plan", EXIT_INPUT)
    finish(run_command("/v1/restore", body, as_json), as_json)


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
app.add_typer(allow_app, name="allow")


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


@app.command()
def probe(
    names: NamesArg = None,
    group: GroupOpt = None,
    all_: AllOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run the gateways' probes now and compare with what their state expects."""
    body = {"targets": targets(names, group, all_), "reason": "probe"}
    result = run_command("/v1/probe", body, as_json)
    if not as_json:
        table = Table("gateway", "probe", "type", "target", "result", "expected", "ok")
        for r in result["results"]:
            for p in (r.get("result") or {}).get("probes", []):
                table.add_row(r["gateway"], str(p.get("name")), str(p.get("type", "")),
                              str(p.get("target", "")), str(p.get("outcome", "")),
                              str(p.get("expected", "")), "yes" if p.get("ok") else "NO")
        if table.row_count:
            out.print(table)
    finish(result, as_json)


# -- state, history, audit -----------------------------------------------------------------


@app.command()
def status(
    refresh: Annotated[bool, typer.Option(help="Poll every gateway now.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Last known state of every gateway (exit 1 if any is unreachable, 6 if unverified)."""
    views = call("GET", "/v1/status", refresh=str(refresh).lower())
    if as_json:
        print_json(views)
    else:
        table = Table("gateway", "reach", "state", "profile", "verification", "since",
                      "by", "reason", "agent / config", "pending / last error")
        for v in views:
            reach = {True: "[green]up[/]", False: "[red]DOWN[/]"}.get(v["reachable"], "?")
            verification = v.get("verification") or "-"
            if v.get("in_sync") is False:
                verification += " [red](drift)[/]"
            note = ""
            if v.get("pending"):
                p = v["pending"]
                note = f"pending {p['action']}" + (f" {p['profile']}" if p.get("profile")
                                                   else "")
            if v.get("last_error"):
                note = (note + "; " if note else "") + v["last_error"]
            table.add_row(v["name"], reach, v.get("state") or "?", v.get("profile") or "-",
                          verification, when(v.get("since")), v.get("actor") or "-",
                          v.get("reason") or "-", agent_label(v), note)
        out.print(table)
    if any(v["reachable"] is False for v in views):
        raise typer.Exit(EXIT_FAILED)
    if any(v.get("state") == "isolated" and (v.get("verification") != "verified"
                                             or v.get("in_sync") is False) for v in views):
        raise typer.Exit(EXIT_UNVERIFIED)


def agent_label(view: dict[str, Any]) -> str:
    """Which agent and config a gateway runs: a mixed fleet shows during an upgrade."""
    digest = (view.get("config_digest") or "").removeprefix("sha256:")[:8]
    return f"{view.get('agent_version') or '?'} / {digest or '?'}"


CSV_FIELDS = ("seq", "time", "actor", "action", "outcome", "targets", "reason", "ticket",
              "command_id", "detail", "hash")


@app.command()
def history(
    gateway: Annotated[str | None, typer.Option(help="Only records about this gateway.")]
    = None,
    since: Annotated[str | None, typer.Option(help="From: 2h, 3d (ago), 2025-07-23, ISO time.")]
    = None,
    until: Annotated[str | None, typer.Option(help="Until (same forms as --since).")] = None,
    actor: Annotated[str | None, typer.Option(help="Only this actor.")] = None,
    action: Annotated[str | None, typer.Option(
        help="Only this action (isolate, restore, gateway, state, ...).")] = None,
    limit: Annotated[int, typer.Option(help="At most this many (most recent).")] = 1000,
    as_json: JsonOpt = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV output.")] = False,
) -> None:
    """What was done, when, by whom, why, and what happened on each gateway."""
    records = call("GET", "/v1/history", gateway=gateway, since=since, until=until,
                   actor=actor, action=action, limit=limit)["records"]
    if as_json:
        print_json(records)
        return
    if as_csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(CSV_FIELDS)
        for r in records:
            writer.writerow([r["seq"], r["time"], r["actor"], r["action"], r["outcome"],
                             " ".join(r["targets"]), r["reason"], r["ticket"] or "",
                             r["command_id"] or "", json.dumps(r["detail"], sort_keys=True),
                             r["hash"]])
        return
    table = Table("#", "time (UTC)", "actor", "action", "outcome", "gateways", "reason",
                  "ticket")
    for r in records:
        shown = r["targets"]
        gws = ", ".join(shown[:4]) + (f" +{len(shown) - 4}" if len(shown) > 4 else "")
        table.add_row(str(r["seq"]), r["time"][:19].replace("T", " "), r["actor"], r["action"],
                      r["outcome"], gws, r["reason"], r["ticket"] or "")
    out.print(table)


REPORT_FORMATS = ("html", "pdf", "csv", "json")


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


@app.command()
def report(
    since: Annotated[str | None, typer.Option(
        help="Start: 2h, 3d (ago), 2025-07-23, ISO time, epoch. Default: 24 h before --until.")]
    = None,
    until: Annotated[str | None, typer.Option(help="End (same forms). Default: now.")] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="html, pdf, csv or json.")]
    = "html",
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write the report to this file (default: standard output; "
        "a PDF goes to standard output only when it is not a terminal).")] = None,
) -> None:
    """The incident report of a time window.

    What was cut, when, by whom and why; what was let through meanwhile (exceptions
    and how long they were open); how the fleet came back (plan stages); time
    isolated per gateway; the timeline picture; and the audit verification result
    with the chain's head hash, so the report can be checked against the audit log
    later. Every action carries its audit seq. HTML and PDF open offline.
    """
    if fmt not in REPORT_FORMATS:
        fail(f"--format: {fmt!r} is not one of {', '.join(REPORT_FORMATS)}", EXIT_INPUT)
    if fmt == "pdf" and output is None and stdout_is_terminal():
        fail("a PDF is binary: give --output FILE, or redirect standard output", EXIT_INPUT)
    api = client()
    try:
        body = api.get_bytes("/v1/report", since=since, until=until, format=fmt)
    except ClientError as exc:
        fail(str(exc), exit_code_for(exc))
    finally:
        api.close()
    if output is None:
        sys.stdout.buffer.write(body)
        sys.stdout.buffer.flush()
        return
    try:
        output.write_bytes(body)
    except OSError as exc:
        fail(f"cannot write {output}: {exc.strerror}", EXIT_INPUT)
    err.print(f"wrote {output} ({len(body)} bytes)", highlight=False)


@app.command()
def whoami() -> None:
    """The user and role of DRAWBRIDGE_TOKEN."""
    me = call("GET", "/v1/whoami")
    out.print(f"{me['user']} ({me['role']})", highlight=False)


def main() -> None:
    app()
