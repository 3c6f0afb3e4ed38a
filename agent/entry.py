"""The `drawbridge-agent` command: the SSH relay without the CLI's imports, else the CLI.

`drawbridge-agent rpc` runs for as long as a controller session lives, once per
session on every gateway: it must start fast and stay small (relay.py).
`drawbridge-agent boot` runs before the network comes up: it must be fast
(boot.py). Every other verb goes to the full CLI (cli.py).
"""

from __future__ import annotations

import sys

_TAKES_VALUE = ("-c", "--config", "--request-id", "--timeout")


def command_of(argv: list[str]) -> str | None:
    """The verb on a `drawbridge-agent [OPTIONS] VERB ...` command line."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _TAKES_VALUE:
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def main() -> None:
    argv = sys.argv[1:]
    command = command_of(argv)
    if command in ("rpc", "boot") and "--help" not in argv:
        from agent.relay import config_from_argv

        config = config_from_argv(argv)
        if command == "boot":
            from agent.boot import boot

            sys.exit(boot(config))
        from agent.relay import relay

        sys.exit(relay(config, sys.stdin.buffer, sys.stdout.buffer))
    from agent.cli import main as cli_main

    cli_main()
