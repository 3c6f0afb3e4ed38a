"""systemd's notify protocol (sd_notify(3)): READY, RELOADING, STOPPING, WATCHDOG pings.

A datagram to $NOTIFY_SOCKET; without it (not under systemd) every call is a no-op.
The standard library is enough: the protocol is one line of text.
"""

from __future__ import annotations

import os
import socket
import time


def notify(message: str) -> bool:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # abstract namespace
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(path)
            sock.sendall(message.encode("utf-8"))
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between pings that $WATCHDOG_USEC asks for (half of it), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.5, int(usec) / 2e6)
    except ValueError:
        return None


def reloading() -> bool:
    """RELOADING=1 with the monotonic timestamp that Type=notify-reload wants."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")
