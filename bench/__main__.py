"""`make bench`: every benchmark, each writing its own section of BENCHMARKS.md.

    .venv/bin/python -m bench [apply] [probes] [fleet] [flows] [recovery] [replicas]
    (default: all)

Runs as root; everything happens inside namespaces the benchmarks create.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from bench import apply, fleet, flows, probe_sweep, recovery, replicas


def _apply() -> None:
    sys.argv = ["bench.apply", "--write"]
    apply.main()


BENCHMARKS: dict[str, Callable[[], None]] = {
    "apply": _apply,
    "probes": lambda: probe_sweep.main(["--write"]),
    "fleet": lambda: fleet.main([]),
    "flows": lambda: flows.main(["--write"]),
    "recovery": lambda: recovery.main(["--write"]),
    "replicas": lambda: replicas.main([]),
}


def main() -> None:
    chosen = sys.argv[1:] or list(BENCHMARKS)
    unknown = set(chosen) - set(BENCHMARKS)
    if unknown:
        sys.exit(f"unknown benchmark(s): {', '.join(sorted(unknown))}; "
                 f"choose from {', '.join(BENCHMARKS)}")
    for name in BENCHMARKS:
        if name in chosen:
            BENCHMARKS[name]()


if __name__ == "__main__":
    main()
