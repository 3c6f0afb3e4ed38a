"""`drawbridge-controller`: run the controller service; make the first tokens.

    drawbridge-controller [--config PATH] serve [--listen HOST:PORT]
    drawbridge-controller [--config PATH] token create --user U --role viewer|operator|admin
    drawbridge-controller [--config PATH] token list | token revoke ID
    drawbridge-controller [--config PATH] migrate
    drawbridge-controller [--config PATH] audit verify

Run on the controller host itself (it reads the database and the audit key
directly); engineers use `drawbridge` against the API instead.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from agent.config import parse_listen
from agent.version import version_callback
from controller.auth import Role
from controller.config import ControllerConfig, load_config
from controller.errors import ControllerError

if TYPE_CHECKING:
    from controller.service import Controller

app = typer.Typer(help="Drawbridge controller service.", no_args_is_help=True,
                  add_completion=False, rich_markup_mode=None)
token_app = typer.Typer(help="API tokens.", no_args_is_help=True, rich_markup_mode=None)
audit_app = typer.Typer(help="The audit log.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(token_app, name="token")
app.add_typer(audit_app, name="audit")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def console_actor() -> str:
    user = os.environ.get("SUDO_USER") or getpass.getuser() or "root"
    return f"{user}@{socket.gethostname().split('.')[0] or 'console'}"[:64]


class Ctx:
    def __init__(self, config_path: Path | None) -> None:
        self.config_path = config_path

    def config(self) -> ControllerConfig:
        try:
            return load_config(self.config_path)
        except ControllerError as exc:
            fail(exc.message, 2)


def _open(ctx: typer.Context) -> Controller:
    from controller.service import Controller

    try:
        return Controller(ctx.obj.config()).open()
    except ControllerError as exc:
        fail(exc.message, 2)


@app.callback()
def main_options(ctx: typer.Context, config: Annotated[Path | None, typer.Option(
        "--config", "-c", envvar="DRAWBRIDGE_CONTROLLER_CONFIG",
        help="Controller config (TOML); default /etc/drawbridge/controller.toml if present."
        )] = None,
        _version: Annotated[bool, typer.Option(
            "--version", is_eager=True, callback=version_callback("drawbridge-controller"),
            help="Print the version and exit.")] = False) -> None:
    ctx.obj = Ctx(config)


@app.command()
def serve(ctx: typer.Context, listen: Annotated[str | None, typer.Option(
        help="HOST:PORT to listen on (default from config: 127.0.0.1:8630).")] = None) -> None:
    """Run the API, the fan-out and the status poller until stopped."""
    import uvicorn

    from controller.api import create_app
    from controller.scheduler import Poller
    from controller.service import Controller

    config = ctx.obj.config()
    try:
        host, port = parse_listen(listen or config.api.listen)
    except ValueError as exc:
        fail(f"--listen: {exc}", 2)
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    try:
        ctl = Controller(config).open()
    except ControllerError as exc:
        fail(exc.message, 2)
    poller = Poller(ctl, config.poll.interval_seconds) if config.poll.enabled else None
    if poller is not None:
        poller.start()
    try:
        uvicorn.run(create_app(ctl), host=host, port=port, log_level=config.log_level,
                    access_log=config.log_level == "debug", timeout_graceful_shutdown=5)
    finally:
        if poller is not None:
            poller.stop()
        ctl.close()


@app.command()
def migrate(ctx: typer.Context) -> None:
    """Create or upgrade the database schema (serve does this on start, too)."""
    ctl = _open(ctx)
    out.print(f"schema version {ctl.db.schema_version()} at {ctl.db.display_url}")
    ctl.close()


@token_app.command("create")
def token_create(
    ctx: typer.Context,
    user: Annotated[str, typer.Option(help="User name (the actor in the audit log).")],
    role: Annotated[str, typer.Option(help="viewer, operator or admin.")],
    description: Annotated[str, typer.Option(help="What the token is for.")] = "",
    reason: Annotated[str, typer.Option(help="Why (kept in the audit log).")]
    = "token created on the controller host",
) -> None:
    """Print a new API token (shown once; only its hash is stored)."""
    ctl = _open(ctx)
    try:
        token = ctl.create_token(user=user, role=Role.parse(role), created_by=console_actor(),
                                 reason=reason, description=description)
    except ControllerError as exc:
        fail(exc.message, 2)
    finally:
        ctl.close()
    print(token)


@token_app.command("list")
def token_list(ctx: typer.Context) -> None:
    """Tokens (ids, users, roles; never the secrets)."""
    ctl = _open(ctx)
    table = Table("id", "user", "role", "created by", "revoked", "description")
    for t in ctl.tokens.list():
        table.add_row(t.id, t.user, t.role, t.created_by, "yes" if t.revoked_at else "",
                      t.description)
    ctl.close()
    out.print(table)


@token_app.command("revoke")
def token_revoke(ctx: typer.Context, token_id: str,
                 reason: Annotated[str, typer.Option(help="Why.")] = "revoked") -> None:
    """Revoke a token by id."""
    from controller.audit import AuditEvent

    ctl = _open(ctx)
    try:
        ctl.tokens.revoke(token_id)
        ctl.record(AuditEvent(actor=console_actor(), action="token.revoke", outcome="ok",
                              reason=reason, detail={"token_id": token_id}))
    except ControllerError as exc:
        fail(exc.message, 1)
    finally:
        ctl.close()
    out.print(f"revoked {token_id}")


@audit_app.command("verify")
def audit_verify(ctx: typer.Context) -> None:
    """Check the audit chain directly in the database."""
    ctl = _open(ctx)
    report = ctl.verify_audit()
    ctl.close()
    if report.ok:
        out.print(f"audit log intact: {report.records} records")
        return
    fail(f"audit log FAILED verification: {report.problem}", 1)


def main() -> None:
    app()
