"""Per-namespace kernel settings in one process (standard library only, runnable by path).

    nsctl.py sysctl  < {"NS": {"net/ipv4/ip_forward": "1", ...}, ...}   (JSON on stdin)
    nsctl.py wait-ready [--timeout S] NS...

``sysctl`` enters each named namespace (``/run/netns/NS``) with setns(2) and
writes the given ``/proc/sys`` keys; ``/proc/sys/net`` always shows the
namespace of the writing thread. ``wait-ready`` waits until, in every named
namespace, no IPv6 address is tentative and every interface has its
link-local address (``/proc/thread-self/net/if_inet6``), and fails if
duplicate address detection failed anywhere. One process instead of
one ``ip netns exec`` per namespace keeps a 50-gateway lab quick to build.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000
IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace open at ``fd``."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextmanager
def netns(name: str) -> Iterator[None]:
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            setns(fd)
        finally:
            os.close(fd)
        yield
    finally:
        setns(own)
        os.close(own)


def apply_sysctls(settings: dict[str, dict[str, str]]) -> None:
    for name, keys in settings.items():
        with netns(name):
            for key, value in keys.items():
                path = "/proc/sys/" + key.replace(".", "/").lstrip("/")
                with open(path, "w") as f:
                    f.write(value)


def address_flags() -> list[tuple[str, str, int]]:
    """(address, interface, flags) of every IPv6 address in the current namespace."""
    out = []
    with open("/proc/thread-self/net/if_inet6") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6:
                out.append((fields[0], fields[5], int(fields[4], 16)))
    return out


def interfaces() -> list[str]:
    """Names of the interfaces of the current namespace, loopback excluded."""
    with open("/proc/thread-self/net/dev") as f:
        names = [line.split(":", 1)[0].strip() for line in f if ":" in line]
    return [n for n in names if n != "lo"]


def not_ready(name: str) -> tuple[list[str], list[str]]:
    """(problems, interfaces still waiting) in namespace ``name``.

    Waiting: an IPv6 address is tentative, or an interface has no link-local
    address yet (IPv6 configures a link only once its operstate is up, which
    the kernel may report up to a second after the carrier comes up).
    """
    with netns(name):
        flags = address_flags()
        ifaces = interfaces()
    problems = [
        f"{name}: {dev} {addr}: DAD failed" for addr, dev, f in flags if f & IFA_F_DADFAILED
    ]
    waiting = sorted({dev for _, dev, f in flags if f & IFA_F_TENTATIVE})
    linklocal = {dev for addr, dev, _ in flags if addr.startswith("fe80")}
    waiting += [dev for dev in ifaces if dev not in linklocal and dev not in waiting]
    return problems, waiting


def wait_ready(names: Sequence[str], timeout: float) -> list[str]:
    """Return problems (empty once every namespace is ready)."""
    deadline = time.monotonic() + timeout
    pending = list(names)
    while True:
        still: dict[str, list[str]] = {}
        for name in pending:
            problems, waiting = not_ready(name)
            if problems:
                return problems
            if waiting:
                still[name] = waiting
        if not still:
            return []
        if time.monotonic() > deadline:
            return [f"{name}: IPv6 not ready on {', '.join(devs)}" for name, devs in still.items()]
        pending = list(still)
        time.sleep(0.01)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="drawbridge_lab.nsctl")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("sysctl")
    wait = sub.add_parser("wait-ready")
    wait.add_argument("--timeout", type=float, default=5.0)
    wait.add_argument("names", nargs="+")
    args = parser.parse_args(argv)
    if args.cmd == "sysctl":
        apply_sysctls(json.load(sys.stdin))
        return 0
    problems = wait_ready(args.names, args.timeout)
    for problem in problems:
        sys.stderr.write(problem + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
