"""`drawbridge audit ...`: verify the chain (and against exported checkpoints), acknowledge
a tamper alarm, export or make checkpoints, reconcile with the gateways' journals.

Exit codes: 0 the check holds; 1 it does not (a broken chain, a failed checkpoint,
a difference with a gateway, a gateway that could not be read); 2 bad input; 3 not
authenticated or not allowed; 4 controller unreachable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from controller.cli_common import (
    EXIT_FAILED,
    EXIT_INPUT,
    JsonOpt,
    TicketOpt,
    call,
    err,
    fail,
    out,
    print_json,
    when,
    write_or_print,
)

# A checkpoint's head hash commits to every record before it: the newest checkpoints of
# a file prove what the older ones do. Only so many go in one request (the API's body
# limit); the rest are named as covered.
MAX_CHECKPOINTS_SENT = 150

audit_app = typer.Typer(help="The audit log: verify, acknowledge an alarm, checkpoints, "
                             "reconcile with the gateways.",
                        no_args_is_help=True, rich_markup_mode=None)
checkpoint_app = typer.Typer(help="Signed checkpoints of the audit chain (kept off the "
                                  "controller: in every gateway's journal, and exported).",
                             no_args_is_help=True, rich_markup_mode=None)
audit_app.add_typer(checkpoint_app, name="checkpoint")


def _checkpoint_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}", EXIT_INPUT)
    except ValueError as exc:
        fail(f"{path}: not JSON: {exc}", EXIT_INPUT)
    if not isinstance(data, dict):
        fail(f"{path}: not a checkpoint file", EXIT_INPUT)
    items = data.get("checkpoints")
    if isinstance(items, list) and len(items) > MAX_CHECKPOINTS_SENT:
        err.print(f"{path}: the newest {MAX_CHECKPOINTS_SENT} of {len(items)} checkpoints are "
                  "checked; each commits to every record before it, so they cover the older "
                  "ones too", highlight=False)
        data = {**data, "checkpoints": items[-MAX_CHECKPOINTS_SENT:]}
    return data


@audit_app.command("verify")
def audit_verify(
    checkpoint: Annotated[list[Path] | None, typer.Option(
        help="A checkpoint file (`audit checkpoint export`): the chain must still hold each "
        "of its checkpoints, i.e. no record up to its seq was changed or removed. "
        "Repeatable.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check the hash chain, the head and the checkpoints; name the first record that
    was edited, removed or moved."""
    if checkpoint:
        files = [{"source": str(p), "content": _checkpoint_file(p)} for p in checkpoint]
        report = call("POST", "/v1/audit/verify", {"checkpoint_files": files})
    else:
        report = call("GET", "/v1/audit/verify")
    if as_json:
        print_json(report)
    else:
        if report.get("alarm"):
            out.print(f"[bold red]TAMPER ALARM:[/] {report['alarm']} (writes are refused "
                      "until an admin acknowledges: drawbridge audit acknowledge)",
                      highlight=False)
        if report["ok"]:
            out.print(f"audit log intact: {report['records']} records, chain verified",
                      highlight=False)
        else:
            out.print(f"[bold red]audit log FAILED verification[/] at record "
                      f"#{report.get('first_bad_seq')}: {report['problem']}", highlight=False)
        shown = [c for c in report.get("checkpoints", []) if c["source"] != "database"
                 or not c["ok"]]
        for c in shown:
            mark = "[green]holds[/]" if c["ok"] else f"[bold red]FAILED[/]: {c['problem']}"
            out.print(f"checkpoint #{c['seq']} ({c['source']}, {c['key']}): {mark}",
                      highlight=False)
        db_ok = sum(1 for c in report.get("checkpoints", []) if c["source"] == "database"
                    and c["ok"])
        if db_ok:
            out.print(f"{db_ok} stored checkpoint(s) hold", highlight=False)
        for note in report.get("notes", []):
            out.print(f"note: {note}", highlight=False)
    if not report["ok"]:
        raise typer.Exit(EXIT_FAILED)


@audit_app.command("acknowledge")
def audit_acknowledge(
    reason: Annotated[str, typer.Option(help="What was found and why the chain as it is "
                                             "now is accepted (kept in the audit log).")],
    ticket: TicketOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """After a tamper alarm (admin): accept the chain as the database holds it now. The
    acknowledgement is recorded with what the alarm saw; writes resume."""
    rec = call("POST", "/v1/audit/acknowledge", {"reason": reason, "ticket": ticket})
    if as_json:
        print_json(rec)
    else:
        out.print(f"tamper alarm acknowledged (record #{rec['seq']}); writes resume",
                  highlight=False)


@checkpoint_app.command("export")
def checkpoint_export(
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write the file here (default: standard output).")] = None,
    last: Annotated[int | None, typer.Option(help="Only the newest N checkpoints.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Every signed checkpoint (seq, head_hash, time, signature, key_id) and the public key,
    as JSON: keep it somewhere the controller's operators cannot write."""
    data = call("GET", "/v1/audit/checkpoints", last=last)
    text = json.dumps(data, indent=2)
    write_or_print(text, output)
    if as_json:
        print_json({"output": str(output), "checkpoints": len(data["checkpoints"]),
                    "key_id": data["key_id"]})
    else:
        out.print(f"wrote {len(data['checkpoints'])} checkpoint(s) to {output} "
                  f"(key {data['key_id']})", highlight=False)


@checkpoint_app.command("create")
def checkpoint_create(as_json: JsonOpt = False) -> None:
    """Sign the chain's head now and send it to every gateway (admin)."""
    made = call("POST", "/v1/audit/checkpoints", {})
    if as_json:
        print_json(made)
        return
    cp = made["checkpoint"]
    missed = {g: v for g, v in made["anchored"].items() if v != "recorded"}
    out.print(f"checkpoint #{cp['seq']} {cp['head_hash']} recorded on "
              f"{len(made['anchored']) - len(missed)} of {len(made['anchored'])} gateway(s)",
              highlight=False)
    for g, why in sorted(missed.items()):
        out.print(f"  {g}: {why}", highlight=False)


@audit_app.command("reconcile")
def audit_reconcile(
    gateway: Annotated[list[str] | None, typer.Option(
        help="Only this gateway (repeatable; default: every gateway).")] = None,
    since: Annotated[str | None, typer.Option(
        help="From: 2h, 3d (ago), 2025-07-23, ISO time (default: as far back as the "
        "journals go).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Compare each gateway's journal with the controller's history: changes the
    controller never ordered (break-glass on the console, or worse), orders that never
    arrived, differing outcomes, checkpoints missing or differing. Exit 0 when they
    agree, 1 when they differ (or a gateway could not be read)."""
    report = call("GET", "/v1/audit/reconcile", gateway=gateway, since=since)
    if as_json:
        print_json(report)
    else:
        table = Table("gateway", "from", "entries", "orders", "checkpoints", "differences")
        for g in report["gateways"]:
            diff = str(len(g["differences"])) if g["error"] is None else f"[red]{g['error']}[/]"
            table.add_row(g["gateway"], when(g["window_start"]), str(g["entries"]),
                          str(g["orders"]), str(g["checkpoints"]), diff)
        out.print(table)
        for g in report["gateways"]:
            for d in g["differences"]:
                out.print(f"[bold]{g['gateway']}[/] {when(d['at'])} [red]{d['kind']}[/]: "
                          f"{d['message']}", highlight=False)
        out.print("the controller and the gateways agree" if report["ok"] else
                  f"[bold red]{report['differences']} difference(s)[/]", highlight=False)
    if not report["ok"]:
        raise typer.Exit(EXIT_FAILED)
