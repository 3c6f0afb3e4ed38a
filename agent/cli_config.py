"""`drawbridge-agent config check`: the config file on disk, checked; applies nothing."""

from __future__ import annotations

import uuid

import typer

from agent.cli_support import Ctx, JsonOpt, fail, out
from agent.errors import DrawbridgeError
from agent.localclient import LocalClient

config_app = typer.Typer(help="The agent's config file.", no_args_is_help=True,
                         rich_markup_mode=None)


@config_app.command("check")
def config_check(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Check the config file on disk: every field, every profile's rules (accepted by the
    kernel in a scratch network namespace, as root); applies nothing. Exit 2 when wrong.
    A running daemon takes a new config on `systemctl reload drawbridge-agent` (SIGHUP)."""
    from agent.config import load_config_and_digest
    from agent.engine import Engine
    from agent.state import DesiredState

    c: Ctx = ctx.obj
    try:
        config, digest = load_config_and_digest(c.config_path)
        engine = Engine(config, config_digest=digest)
        for name in config.profile_names():
            policy = engine.policy_for(DesiredState(profile=name))
            assert policy is not None
            engine.kernel.reference(policy)
    except DrawbridgeError as exc:
        fail(str(exc), 2)
    running = _running_digest(c)
    report = {"config": str(c.config_path), "config_digest": digest, "ok": True,
              "profiles": config.profile_names(), "running_config_digest": running}
    if as_json:
        out.print_json(data=report)
        return
    out.print(f"{c.config_path}: ok (digest {digest}); profiles: "
              f"{', '.join(config.profile_names())}", highlight=False)
    if running is not None and running != digest:
        out.print(f"the running agent has config {running}: `systemctl reload "
                  "drawbridge-agent` (SIGHUP) makes it take this one", highlight=False)


def _running_digest(c: Ctx) -> str | None:
    try:
        client = LocalClient.connect(c.socket_path, 5.0)
    except OSError:
        return None
    if client is None:
        return None
    try:
        answer = client.call({"v": 1, "id": f"cli-{uuid.uuid4().hex[:16]}", "op": "ping"})
    except (ConnectionError, OSError):
        return None
    finally:
        client.close()
    result = answer.get("result") or {}
    return str(result.get("config_digest")) if answer.get("ok") else None


