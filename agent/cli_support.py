"""What every verb of `drawbridge-agent` shares: how it reaches the agent, how it fails,
which options it takes. Loads nothing of the agent itself: a running daemon answers
the CLI without pydantic, the engine or the config's validation being imported."""

from __future__ import annotations

import getpass
import json
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console

from agent.durations import parse_duration
from agent.errors import DrawbridgeError
from agent.localclient import LocalClient
from agent.relay import state_dir_of
from agent.wire import SOCKET_FILE

if TYPE_CHECKING:  # loaded only on the direct path
    from agent.config import AgentConfig
    from agent.rpc import Dispatcher

EXIT_BY_CODE = {"bad_request": 2, "bad_json": 2, "too_large": 2, "config_error": 2,
                "unsupported_version": 2, "conflict": 2, "nft_error": 3, "state_error": 4,
                "busy": 5}
EXIT_UNVERIFIED = 6

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
ActorOpt = Annotated[str | None, typer.Option(help="Who (default: USER@console).")]
TicketOpt = Annotated[str | None, typer.Option(help="Ticket id.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="JSON output.")]


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
            from agent.config import load_config

            try:
                self._config = load_config(self.config_path)
            except DrawbridgeError as exc:
                fail(str(exc), exc.exit_code)
        return self._config

    @property
    def socket_path(self) -> Path:
        """The daemon's socket, from the config's state_dir read without validating the
        rest: a running daemon answers even while the file on disk is being edited (it
        runs the config it loaded; `config check` says what is wrong with the new one)."""
        return state_dir_of(self.config_path) / SOCKET_FILE

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
            client = LocalClient.connect(self.socket_path, self.timeout)
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


ConfirmOpt = Annotated[str | None, typer.Option(
    "--confirm-within", help="Commit-confirmed: unless `drawbridge-agent confirm` (or the "
    "controller) confirms within this time (e.g. 60s, 5m; at least 5s), the agent returns to "
    "the previous closed state by itself. Needs the daemon.")]


def confirm_args(value: str | None) -> dict[str, int]:
    if value is None:
        return {}
    try:
        return {"confirm_within_seconds": parse_duration(value)}
    except ValueError as exc:
        fail(f"--confirm-within: {exc}", 2)


def seconds(duration: str) -> int:
    try:
        return parse_duration(duration)
    except ValueError as exc:
        fail(f"--for: {exc}", 2)
