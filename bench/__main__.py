"""`make bench`: every benchmark, each writing its own section of BENCHMARKS.md.

    .venv/bin/python -m bench [apply] [probes] [fleet]     (default: all three)

Runs as root; everything happens inside namespaces the benchmarks create.
"""

from __future__ import annotations

import sys

from bench import apply, fleet, probe_sweep


def main() -> None:
    chosen = set(sys.argv[1:]) or {"apply", "probes", "fleet"}
    unknown = chosen - {"apply", "probes", "fleet"}
    if unknown:
        sys.exit(f"unknown benchmark(s): {', '.join(sorted(unknown))}; "
                 "choose from apply, probes, fleet")
    if "apply" in chosen:
        sys.argv = ["bench.apply", "--write"]
        apply.main()
    if "probes" in chosen:
        probe_sweep.main(["--write"])
    if "fleet" in chosen:
        fleet.main([])


if __name__ == "__main__":
    main()
