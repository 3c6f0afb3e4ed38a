"""Probes: prove, from this host, what is reachable and what is not.

Four kinds, IPv4 and IPv6 alike:

- ``icmp``: an echo request; ``reachable`` when the target's echo reply comes back.
- ``tcp-syn``: one SYN; ``open`` (SYN-ACK), ``closed`` (RST) or ``filtered`` (no
  answer, or an ICMP error). Open and closed are both ``reachable``: the target
  answered, so packets crossed every firewall on the way in both directions.
- ``tcp``: a plain connect; ``connected`` or ``refused`` are ``reachable``, a
  timeout or an unreachable error is not.
- ``dns``: a DNS query over UDP; any reply carrying the query's id (or the
  target's "port unreachable") is ``reachable``.

The coarse ``outcome`` (reachable / unreachable / error) is what expectations
are written against; ``detail`` says what exactly came back. "Reachable" is
about the path, not the service: while isolated, a RST from an outside host is
as much a leak as a completed handshake.

How a sweep works (one loop over non-blocking sockets, raw IP sockets for ICMP echo and
TCP SYN) is in agent.probe_sweep; the packets it sends and the answers it recognises are
in agent.probe_wire; ``ProbeSpec`` and ``Measurement`` are in agent.probe_types. This
module judges measurements against expectations, and is the command line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from agent.config import ProbeConfig
from agent.probe_sweep import measure
from agent.probe_types import Measurement, Outcome, ProbeSpec
from agent.probe_wire import load_scapy

# ---------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class ProbeResult:
    name: str
    type: str
    target: str
    outcome: Outcome
    detail: str
    expected: str
    ok: bool
    duration_seconds: float
    checked_at: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (f"{self.name}: expected {self.expected}, got {self.outcome} ({self.detail}) "
                f"in {self.duration_seconds * 1000:.0f} ms")


def judge(outcome: Outcome, expected: str) -> bool:
    """Does what a probe found agree with what it should find? `any` is never checked."""
    return expected == "any" or outcome == expected


def run_probes(
    probes: Sequence[ProbeConfig],
    *,
    isolated: bool,
    measure_fn: Callable[[Sequence[ProbeSpec]], list[Measurement]] | None = None,
    clock: Callable[[], float] = time.time,
) -> list[ProbeResult]:
    """Run `probes` concurrently and judge each against its expectation for the state."""
    if not probes:
        return []
    checked_at = clock()
    measurements = (measure_fn or measure)([ProbeSpec.of(p) for p in probes])
    results = []
    for probe, m in zip(probes, measurements, strict=True):
        expected = probe.expect.for_state(isolated)
        results.append(ProbeResult(
            name=probe.name, type=probe.type, target=probe.target, outcome=m.outcome,
            detail=m.detail, expected=expected, ok=judge(m.outcome, expected),
            duration_seconds=round(m.duration_seconds, 6), checked_at=checked_at,
        ))
    return results

# ---------------------------------------------------------------------------- command line


def _sweep_json(targets: Sequence[str], timeout: float) -> dict[str, Any]:
    specs = [ProbeSpec.parse(t, timeout) for t in targets]
    started = time.monotonic()
    found = measure(specs)
    return {"seconds": round(time.monotonic() - started, 6),
            "results": [{"probe": t, **asdict(m)} for t, m in zip(targets, found, strict=True)]}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m agent.probes [--timeout S] [--json] TYPE:TARGET...`` (labs, benchmarks):
    probe from the current network namespace and print what came back. With ``--serve``
    it reads one JSON request per line on stdin (``{"targets": [...], "timeout": 1}``)
    and answers each with one JSON line, paying the start-up (scapy) only once."""
    parser = argparse.ArgumentParser(prog="python -m agent.probes", description=main.__doc__)
    parser.add_argument("targets", nargs="*", help="e.g. icmp:198.51.100.10 "
                        "tcp-syn:[2001:db8::1]:443 tcp:10.0.0.1:22 dns:192.0.2.53")
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--json", action="store_true", help="JSON lines output")
    parser.add_argument("--serve", action="store_true", help="requests on stdin, JSON lines")
    args = parser.parse_args(argv)
    if args.serve:
        load_scapy()
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                req = json.loads(line)
                reply = _sweep_json(req["targets"], float(req.get("timeout", args.timeout)))
            except (ValueError, KeyError, TypeError) as exc:
                reply = {"error": str(exc)}
            print(json.dumps(reply), flush=True)
        return 0
    if not args.targets:
        parser.error("give at least one TYPE:TARGET (or --serve)")
    try:
        specs = [ProbeSpec.parse(t, args.timeout) for t in args.targets]
    except ValueError as exc:
        parser.error(str(exc))
    for text, m in zip(args.targets, measure(specs), strict=True):
        if args.json:
            print(json.dumps({"probe": text, **asdict(m)}))
        else:
            print(f"{text}\t{m.outcome}\t{m.detail}\t{m.duration_seconds * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
