"""What every command of `drawbridge` shares: the API client, output, errors, exit codes.

Exit codes: 0 ok; 1 a gateway failed, was unreachable or refused (or, for the audit
commands, the check failed); 2 bad input; 3 not authenticated or not allowed; 4
controller unreachable or internal error; 6 applied but not verified; 7 a restore plan
waits for a person (an approval, or it is paused).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from controller.client import DEFAULT_URL, ApiClient, ClientError

EXIT_FAILED, EXIT_INPUT, EXIT_AUTH, EXIT_CONTROLLER, EXIT_UNVERIFIED = 1, 2, 3, 4, 6
EXIT_WAITING = 7  # a restore plan waits for a person (approval, or paused)

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="JSON output.")]
ReasonOpt = Annotated[str, typer.Option(help="Why (kept in the audit log, sent to the gateway).")]
AuditReasonOpt = Annotated[str, typer.Option(help="Why (kept in the audit log).")]
TicketOpt = Annotated[str | None, typer.Option(help="Ticket id (optional).")]
GroupOpt = Annotated[list[str] | None, typer.Option("--group", "-g",
                                                    help="Every gateway in this group.")]
AllOpt = Annotated[bool, typer.Option("--all", help="Every gateway in the inventory.")]
NamesArg = Annotated[list[str] | None, typer.Argument(help="Gateway names.")]


def print_json(data: Any) -> None:
    """Plain JSON on stdout for scripts (no colours, no wrapping)."""
    print(json.dumps(data, indent=2, sort_keys=False))


def fail(message: str, code: int) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def write_or_print(text: str, output: Path | None) -> None:
    """`text` to the file `output` (a trailing newline added), or to stdout without one."""
    if output is None:
        print(text)
        return
    try:
        output.write_text(text + "\n", encoding="utf-8")
    except OSError as exc:
        fail(f"cannot write {output}: {exc.strerror}", EXIT_INPUT)


def exit_code_for(exc: ClientError) -> int:
    if exc.status in (401, 403):
        return EXIT_AUTH
    if 400 <= exc.status < 500:
        return EXIT_INPUT
    return EXIT_CONTROLLER


def client() -> ApiClient:
    return ApiClient(os.environ.get("DRAWBRIDGE_URL", DEFAULT_URL),
                     os.environ.get("DRAWBRIDGE_TOKEN"))


def call(method: str, path: str, body: Any = None, **params: Any) -> Any:
    api = client()
    try:
        if method == "GET":
            return api.get(path, **params)
        if method == "DELETE":
            return api.delete(path, body)
        if method == "PATCH":
            return api.patch(path, body)
        return api.post(path, body)
    except ClientError as exc:
        fail(str(exc), exit_code_for(exc))
    finally:
        api.close()


def targets(names: list[str] | None, groups: list[str] | None, all_: bool) -> dict[str, Any]:
    if not names and not groups and not all_:
        fail("say which gateways: NAME..., --group G or --all", EXIT_INPUT)
    if all_ and (names or groups):
        fail("--all cannot be combined with names or --group", EXIT_INPUT)
    return {"gateways": names or [], "groups": groups or [], "all": all_}


def when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
