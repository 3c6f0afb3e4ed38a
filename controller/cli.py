"""`drawbridge`: the engineer's command line against the controller's API.

The commands with fan-out (isolate, restore, probe; their progress, results table and
exit code: controller/cli_fanout.py) and the reads (status, history, report, whoami)
are here; the command groups are modules of their own: `allow`
(controller/cli_exceptions.py), `gateway` and `token` (controller/cli_inventory.py),
`audit` (controller/cli_audit.py), `plan` (controller/cli_plans.py).

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
from typing import Annotated, Any

import typer
from rich.table import Table

from agent.version import version_callback
from controller.cli_audit import audit_app
from controller.cli_common import (
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
from controller.cli_exceptions import allow_app
from controller.cli_fanout import finish, run_command
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
app.add_typer(allow_app, name="allow")


@app.callback()
def main_options(_version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=version_callback("drawbridge"),
        help="Print the version and exit.")] = False) -> None:
    pass  # the options every command shares; the help is the app's (HELP)

# -- commands with fan-out (their output: controller/cli_fanout.py) ---------------------


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
