"""`drawbridge-controller`: run the controller service; make the first tokens.

    drawbridge-controller [--config PATH] serve [--listen HOST:PORT]
    drawbridge-controller [--config PATH] token create --user U --role viewer|operator|admin
    drawbridge-controller [--config PATH] token list | token revoke ID
    drawbridge-controller [--config PATH] migrate
    drawbridge-controller [--config PATH] audit verify [--checkpoint FILE]... [--json]
    drawbridge-controller [--config PATH] audit acknowledge --reason R [--json]
    drawbridge-controller [--config PATH] audit checkpoint export [-o FILE] [--json]

Run on the controller host itself (it reads the database and the audit key
directly); engineers use `drawbridge` against the API instead.
"""

from __future__ import annotations

import getpass
import json
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
    _raise_open_files_limit()
    tls = config.api.tls_cert is not None
    for path in (config.api.tls_cert, config.api.tls_key):
        if path is not None and not path.is_file():
            fail(f"api.tls_cert/tls_key: {path} is not a readable file", 2)
    try:
        # as a replica: registered, holding its first leases, its queue worker running
        ctl = Controller(config).start(api=f"{'https' if tls else 'http'}://{host}:{port}")
    except ControllerError as exc:
        fail(exc.message, 2)
    if ctl.replicas is not None:
        logging.getLogger("drawbridge.controller").info(
            "replica %s: holds %d gateway(s)", ctl.replicas.me.replica_id,
            len(ctl.replicas.held()))
    if ctl.audit.alarm is not None:
        err.print(f"[bold red]AUDIT TAMPER ALARM:[/] {ctl.audit.alarm.problem}\n"
                  "Serving (reads only); writes are refused until an admin acknowledges: "
                  "drawbridge audit acknowledge --reason ...", highlight=False)
    jobs = Poller(ctl, config.poll.interval_seconds, polls=config.poll.enabled)
    jobs.start()
    try:
        uvicorn.run(create_app(ctl), host=host, port=port, log_level=config.log_level,
                    access_log=config.log_level == "debug", timeout_graceful_shutdown=5,
                    ssl_certfile=str(config.api.tls_cert) if tls else None,
                    ssl_keyfile=str(config.api.tls_key) if tls else None)
    finally:
        jobs.stop()
        ctl.close()


def _raise_open_files_limit() -> None:
    """A socket per gateway: the soft limit on open files (often 1024) goes up to the
    hard one (systemd's default hard limit is 524288), before the first connection."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            err.print(f"warning: cannot raise the open files limit from {soft}: {exc}")


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
                 reason: Annotated[str, typer.Option(help="Why (kept in the audit log).")]
                 ) -> None:
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
def audit_verify(
    ctx: typer.Context,
    checkpoint: Annotated[list[Path] | None, typer.Option(
        help="A checkpoint file (from `audit checkpoint export`); repeatable.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
) -> None:
    """Check the audit chain directly in the database (and against checkpoint files)."""
    from controller.checkpoint_keys import claims_from, parse_checkpoint_file

    ctl = _open(ctx)
    try:
        claims = []
        for path in checkpoint or []:
            public, cps = parse_checkpoint_file(_read_json(path), str(path))
            claims += claims_from(cps, source=str(path), file_public=public,
                                  controller_public=ctl.checkpoints.key.public_raw)
        report = ctl.verify_audit(claims)
    except ControllerError as exc:
        fail(exc.message, 2)
    finally:
        ctl.close()
    if as_json:
        print(report.model_dump_json(indent=2))
    elif report.ok:
        out.print(f"audit log intact: {report.records} records, "
                  f"{len(report.checkpoints)} checkpoint(s) agree", highlight=False)
    else:
        err.print(f"[bold red]audit log FAILED verification:[/] {report.problem}",
                  highlight=False)
    if not report.ok:
        raise typer.Exit(1)


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}", 2)
    except ValueError as exc:
        fail(f"{path}: not JSON: {exc}", 2)


@audit_app.command("acknowledge")
def audit_acknowledge(
    ctx: typer.Context,
    reason: Annotated[str, typer.Option(help="What was found, and why the chain as it is "
                                             "now is accepted (kept in the audit log).")],
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
) -> None:
    """After a tamper alarm: accept the chain as the database holds it now (recorded, with
    what the alarm saw); writes resume. Exit 1 if there is no alarm."""
    ctl = _open(ctx)
    try:
        rec = ctl.audit.acknowledge(actor=console_actor(), reason=reason)
    except ControllerError as exc:
        fail(exc.message, 1)
    finally:
        ctl.close()
    if as_json:
        print(rec.model_dump_json(indent=2))
    else:
        out.print(f"alarm acknowledged: record #{rec.seq}", highlight=False)


checkpoint_app = typer.Typer(help="Signed checkpoints of the audit chain.",
                             no_args_is_help=True, rich_markup_mode=None)
audit_app.add_typer(checkpoint_app, name="checkpoint")


@checkpoint_app.command("export")
def checkpoint_export(
    ctx: typer.Context,
    output: Annotated[Path | None, typer.Option("--output", "-o",
                                                help="Write here (default: stdout).")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="With --output: say what was written, as JSON.")] = False,
) -> None:
    """Every signed checkpoint with the public key, as JSON (keep it off this host)."""
    ctl = _open(ctx)
    try:
        exported = ctl.checkpoints.export()
        text = exported.model_dump_json(indent=2)
    finally:
        ctl.close()
    from controller.cli_common import write_or_print  # brings the HTTP client: here only

    write_or_print(text, output)
    count = len(exported.checkpoints)
    if as_json:
        print(json.dumps({"output": str(output), "checkpoints": count}))
    else:
        out.print(f"wrote {count} checkpoint(s) to {output}", highlight=False)


def main() -> None:
    app()
