"""Commands with fan-out (isolate, restore, allow, probe): POST the command, stream the
per-gateway results into a progress bar, print the results table, exit by outcome.

Exit codes: 0 every gateway applied (and verified where there is something to
verify); 1 at least one gateway failed, was unreachable or refused; 6 applied but not
verified on at least one gateway (and none failed); 4 the stream ended without a
result.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, NoReturn

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from controller.cli_common import (
    EXIT_CONTROLLER,
    EXIT_FAILED,
    EXIT_UNVERIFIED,
    client,
    err,
    exit_code_for,
    fail,
    out,
    print_json,
)
from controller.client import ClientError

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
