"""`make bench`: every benchmark, each writing its own section of BENCHMARKS.md.

    .venv/bin/python -m bench [apply] [probes] [fleet] [replicas]     (default: all four)

Runs as root; everything happens inside namespaces the benchmarks create.
"""

from __future__ import annotations

import sys

from bench import apply, fleet, probe_sweep, replicas


def main() -> None:
    every = {"apply", "probes", "fleet", "replicas"}
    chosen = set(sys.argv[1:]) or every
    unknown = chosen - every
    if unknown:
        sys.exit(f"unknown benchmark(s): {', '.join(sorted(unknown))}; "
                 "choose from apply, probes, fleet, replicas")
    if "apply" in chosen:
        sys.argv = ["bench.apply", "--write"]
        apply.main()
    if "probes" in chosen:
        probe_sweep.main(["--write"])
    if "fleet" in chosen:
        fleet.main([])
    if "replicas" in chosen:
        replicas.main([])


if __name__ == "__main__":
    main()
