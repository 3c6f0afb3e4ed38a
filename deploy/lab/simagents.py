"""Many simulated gateways in one process: one SSH server (asyncssh) answering like
`drawbridge-agent rpc` for each of them, for benchmarks at fleet sizes the namespace
lab cannot build (a real gateway costs a namespace, an agent daemon and an sshd).

    python -m drawbridge_lab.simagents --count 1000 --port 2222 --host-key KEY \\
        --authorized-keys FILE --journal FILE [--apply-ms 20] [--ready FILE]

One listening socket (0.0.0.0:PORT); gateway i is the address 127.0.<i // 250>.<i % 250 + 1>
(every 127/8 address is loopback on Linux), and a connection's gateway is the local
address it reached. Real SSH (key exchange, public key authentication, exec channels,
the agent's newline-delimited JSON protocol v1 with request ids answered once);
unlike a real gateway: no nftables and no probes (a change "applies" by waiting
--apply-ms and is always verified), one host key for all, state in memory, loopback
instead of a network. Any other exec (Ansible's `-m raw`) waits --apply-ms and exits 0.
The journal file gets one line per applied change: gateway, request id, op.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import resource
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import asyncssh

PROTOCOL = 1


def address(i: int) -> str:
    """Gateway i's address (127.0.0.1 .. 127.3.231.250 for 1000 gateways)."""
    return f"127.{i // 62500}.{i // 250 % 250}.{i % 250 + 1}"


def name(i: int) -> str:
    return f"sim-{i:04d}"


def addresses(count: int) -> Iterator[tuple[str, str]]:
    for i in range(count):
        yield name(i), address(i)


@dataclass
class SimGateway:
    name: str
    state: str = "open"
    profile: str | None = None
    generation: int = 0
    actor: str = ""
    reason: str = ""
    since: float = 0.0
    answered: dict[str, tuple[str, Any]] = field(default_factory=dict)  # id -> digest, answer

    def change(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op == "isolate":
            self.state, self.profile = "isolated", str(args.get("profile", "internet"))
        else:
            self.state, self.profile = "open", None
        self.generation += 1
        self.actor, self.reason = str(args.get("actor", "")), str(args.get("reason", ""))
        self.since = time.time()
        return {"action": op, "gateway": self.name, "state": self.state,
                "profile": self.profile, "changed": True, "in_sync": True, "problems": [],
                "verification": {"status": "verified", "checked_at": time.time(),
                                 "failing": [], "detail": []},
                "apply_seconds": 0.0, "generation": self.generation, "note": "simulated"}

    def status(self) -> dict[str, Any]:
        return {"gateway": self.name, "state": self.state, "profile": self.profile,
                "since": self.since, "actor": self.actor, "reason": self.reason,
                "in_sync": True, "problems": [],
                "verification": {"status": "verified", "checked_at": time.time(),
                                 "failing": [], "detail": []},
                "exceptions": [], "generation": self.generation, "drift_repairs": 0}


class Fleet:
    def __init__(self, count: int, apply_seconds: float, journal: IO[str]) -> None:
        self.by_address = {addr: SimGateway(gw) for gw, addr in addresses(count)}
        self.apply_seconds = apply_seconds
        self.journal = journal
        self.connections = 0

    async def answer(self, gw: SimGateway, line: str) -> dict[str, Any]:
        try:
            req = json.loads(line)
            rid, op, args = str(req.get("id", "")), str(req["op"]), dict(req.get("args") or {})
        except (ValueError, KeyError, TypeError):
            return {"v": 1, "id": "", "ok": False,
                    "error": {"code": "bad_request", "message": "not a request"}}
        if op == "ping":
            return {"v": 1, "id": rid, "ok": True,
                    "result": {"gateway": gw.name, "protocol": PROTOCOL}}
        if op == "status":
            return {"v": 1, "id": rid, "ok": True, "result": gw.status()}
        if op in ("exceptions", "probe", "journal"):
            return {"v": 1, "id": rid, "ok": True, "result": {"gateway": gw.name,
                                                              "exceptions": [], "probes": []}}
        if op not in ("isolate", "restore"):
            return {"v": 1, "id": rid, "ok": False,
                    "error": {"code": "bad_request", "message": f"unsupported op {op}"}}
        digest = hashlib.sha256(json.dumps([op, args], sort_keys=True).encode()).hexdigest()
        if rid in gw.answered:  # the agent's rule: a seen id is answered, not applied
            seen, answer = gw.answered[rid]
            if seen != digest:
                return {"v": 1, "id": rid, "ok": False,
                        "error": {"code": "conflict", "message": "request id used"}}
            return {"v": 1, "id": rid, "ok": True, "result": {**answer, "replayed": True}}
        await asyncio.sleep(self.apply_seconds)
        result = gw.change(op, args)
        gw.answered[rid] = (digest, result)
        self.journal.write(f"{gw.name} {rid} {op}\n")
        return {"v": 1, "id": rid, "ok": True, "result": result}

    async def session(self, process: asyncssh.SSHServerProcess[str]) -> None:
        sockname = process.get_extra_info("sockname")
        gw = self.by_address.get(sockname[0] if sockname else "")
        command = process.command or ""
        if gw is None:
            process.stderr.write("no gateway at this address\n")
            process.exit(1)
            return
        if "rpc" not in command:  # anything else (Ansible -m raw): "applied", exit 0
            await asyncio.sleep(self.apply_seconds)
            process.stdout.write("applied\n")
            process.exit(0)
            return
        try:
            async for line in process.stdin:
                if line.strip():
                    answer = await self.answer(gw, line)
                    process.stdout.write(json.dumps(answer, separators=(",", ":")) + "\n")
        except (asyncssh.BreakReceived, asyncssh.TerminalSizeChanged,
                asyncssh.DisconnectError, ConnectionError):
            pass
        with contextlib.suppress(OSError, asyncssh.Error):
            process.exit(0)


async def serve(args: argparse.Namespace) -> None:
    with open(args.journal, "a", buffering=1, encoding="utf-8") as journal:
        fleet = Fleet(args.count, args.apply_ms / 1000, journal)
        server = await asyncssh.create_server(
            asyncssh.SSHServer, "", args.port, server_host_keys=[str(args.host_key)],
            authorized_client_keys=str(args.authorized_keys),
            process_factory=fleet.session, encoding="utf-8", backlog=4096,
            keepalive_interval=0)
        if args.ready:
            Path(args.ready).write_text("ready\n")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--port", type=int, default=2222)
    ap.add_argument("--host-key", type=Path, required=True)
    ap.add_argument("--authorized-keys", type=Path, required=True)
    ap.add_argument("--journal", type=Path, required=True)
    ap.add_argument("--apply-ms", type=float, default=20.0)
    ap.add_argument("--ready", type=Path)
    args = ap.parse_args(argv)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # a socket per connection
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
