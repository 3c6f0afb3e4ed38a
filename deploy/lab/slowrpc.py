"""A gateway whose agent answers `status` slowly (a test rig, for the controller's
"commands never wait behind polls" check): it stands as the SSH forced command in front
of the real `drawbridge-agent rpc`, passes every request and answer through, and holds
each status request back for --delay seconds first, the way a loaded gateway or a
huge read-back would. Each status is logged (start and end, wall clock) to --log, so a
test can tell that a command really arrived while a status was in flight.

    python -m drawbridge_lab.slowrpc --delay 3 --log status.log -- drawbridge-agent -c C rpc
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _op(line: bytes) -> str | None:
    try:
        request = json.loads(line)
    except ValueError:
        return None
    op = request.get("op") if isinstance(request, dict) else None
    return op if isinstance(op, str) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="drawbridge_lab.slowrpc")
    parser.add_argument("--delay", type=float, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    agent = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert agent.stdin is not None and agent.stdout is not None
    out = sys.stdout.buffer
    with args.log.open("a", buffering=1) as log:
        for line in sys.stdin.buffer:
            slow = _op(line) == "status"
            if slow:
                log.write(f"start {time.time():.6f}\n")
                time.sleep(args.delay)
            agent.stdin.write(line)
            agent.stdin.flush()
            answer = agent.stdout.readline()
            if not answer:
                break
            out.write(answer)
            out.flush()
            if slow:
                log.write(f"end {time.time():.6f}\n")
    agent.stdin.close()
    return agent.wait()


if __name__ == "__main__":
    sys.exit(main())
