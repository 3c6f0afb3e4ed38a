"""``drawbridge-lab``: keep a namespace lab up for demos and manual testing.

    drawbridge-lab up [--gateways N] [--prefix P]   build, print JSON, record in the state dir
    drawbridge-lab down [--all] [RUN_PREFIX...]     remove recorded labs (--all: every dbl-* ns)
    drawbridge-lab list                             recorded labs and other lab namespaces
    drawbridge-lab cleanup                          remove leftovers of dead processes only

Recorded labs live in ``/run/drawbridge-lab/<run>.json`` (``$DRAWBRIDGE_LAB_STATE_DIR``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from .netns import (
    DEFAULT_PREFIX,
    LabError,
    list_namespaces,
    pid_alive,
    run_id_pattern,
    state_dir,
)
from .topology import Lab, cleanup_stale, remove_lab


def _recorded() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    directory = state_dir()
    if not directory.is_dir():
        return out
    for path in sorted(directory.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("prefix"), str):
            out.append(record)
    return out


def cmd_up(args: argparse.Namespace) -> int:
    lab = Lab.create(gateways=args.gateways, prefix=args.prefix, keep=True)
    info = {**lab.describe(), "build_seconds": round(lab.build_seconds, 3)}
    directory = state_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{lab.prefix.rstrip('-')}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(path)
    json.dump({**info, "state_file": str(path)}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    removed: list[str] = []
    targets = list(args.runs) or [r["prefix"] for r in _recorded()]
    if args.all:
        targets = [r["prefix"] for r in _recorded()]
    for run in targets:
        removed += remove_lab(run if run.endswith("-") else run + "-")
    if args.all:
        removed += cleanup_stale(args.prefix, everything=True)
    json.dump({"removed": removed}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    recorded = _recorded()
    kept = {r["prefix"] for r in recorded}
    pattern = run_id_pattern(args.prefix)
    others: dict[str, dict[str, Any]] = {}
    for name in list_namespaces(args.prefix):
        m = pattern.match(name)
        run = m["run"] if m else name
        if run in kept:
            continue
        entry = others.setdefault(
            run,
            {
                "prefix": run,
                "pid": int(m["pid"]) if m else None,
                "owner_alive": pid_alive(int(m["pid"])) if m else None,
                "namespaces": [],
            },
        )
        entry["namespaces"].append(name)
    labs = [
        {
            "prefix": r["prefix"],
            "gateways": len(r.get("gateways", [])),
            "namespaces_present": len(list_namespaces(r["prefix"])),
            "outside_ns": r.get("outside", {}).get("ns"),
            "mgmt_ns": r.get("mgmt", {}).get("ns"),
        }
        for r in recorded
    ]
    json.dump({"recorded": labs, "other": list(others.values())}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    json.dump({"removed": cleanup_stale(args.prefix)}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="drawbridge-lab", description="Drawbridge namespace lab")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build a lab and keep it")
    up.add_argument("--gateways", type=int, default=1)
    up.add_argument("--prefix", default=DEFAULT_PREFIX, help="namespace name prefix")
    up.set_defaults(func=cmd_up)
    down = sub.add_parser("down", help="remove recorded labs")
    down.add_argument("runs", nargs="*", help="run prefixes (default: every recorded lab)")
    down.add_argument(
        "--all", action="store_true", help="also delete every namespace with the prefix"
    )
    down.add_argument("--prefix", default=DEFAULT_PREFIX)
    down.set_defaults(func=cmd_down)
    ls = sub.add_parser("list", help="show recorded labs and other lab namespaces")
    ls.add_argument("--prefix", default=DEFAULT_PREFIX)
    ls.set_defaults(func=cmd_list)
    clean = sub.add_parser("cleanup", help="remove namespaces of dead lab owners")
    clean.add_argument("--prefix", default=DEFAULT_PREFIX)
    clean.set_defaults(func=cmd_cleanup)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.func(args)
    except (LabError, ValueError, OSError) as exc:
        sys.stderr.write(f"drawbridge-lab: {exc}\n")
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
