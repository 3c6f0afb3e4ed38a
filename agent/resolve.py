"""Management hostnames (`host =` entries), resolved on their own schedule, never under the lock.

Isolation cuts the resolver off: a lookup can then block for ~10 s per nameserver.
So lookups run here, with a short timeout, outside the agent's lock (the daemon
refreshes on a schedule, the break-glass CLI once before it takes the lock), and
the engine only ever reads the last good answers. They are kept on disk too, so
a gateway rebooted during a DNS outage still lets its controller in. A host that
never resolved is left out of the ruleset and reported (status, metrics); it
never holds up a request.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.nettypes import IPNetwork

RESOLVED_FILE = "resolved.json"
Lookup = Callable[[str], "tuple[IPNetwork, ...]"]


def getaddrinfo_lookup(host: str) -> tuple[IPNetwork, ...]:
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    addrs = sorted({str(info[4][0]).split("%")[0] for info in infos})
    return tuple(ipaddress.ip_network(a) for a in addrs)


class ManagementHosts:
    def __init__(self, hosts: Iterable[str], *, state_dir: Path | None = None,
                 lookup: Lookup = getaddrinfo_lookup, timeout: float = 2.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.hosts = tuple(dict.fromkeys(hosts))
        self.lookup = lookup
        self.timeout = timeout
        self.clock = clock
        self._path = state_dir / RESOLVED_FILE if state_dir is not None else None
        self._lock = threading.Lock()
        self._answers: dict[str, tuple[IPNetwork, ...]] = self._load()
        self._failures: dict[str, str] = {}
        self.refreshed_at: float | None = None
        self._pool: ThreadPoolExecutor | None = None

    def answers(self) -> dict[str, tuple[IPNetwork, ...]]:
        """The last good answer of every host that ever resolved (no network)."""
        with self._lock:
            return dict(self._answers)

    def failures(self) -> dict[str, str]:
        """Hosts whose last lookup failed, and why (their last good answer still holds)."""
        with self._lock:
            return {h: e + ("" if h in self._answers else "; never resolved: left out")
                    for h, e in self._failures.items()}

    def refresh(self) -> None:
        """Look every host up, each within `timeout` (a lookup still hanging after it is
        abandoned, not waited for)."""
        if not self.hosts:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=min(8, len(self.hosts)),
                                            thread_name_prefix="resolve")
        futures = {host: self._pool.submit(self.lookup, host) for host in self.hosts}
        deadline = time.monotonic() + self.timeout
        answers: dict[str, tuple[IPNetwork, ...]] = {}
        failures: dict[str, str] = {}
        for host, future in futures.items():
            try:
                result = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                failures[host] = f"no answer within {self.timeout:g}s"
            except (OSError, ValueError) as exc:
                failures[host] = str(getattr(exc, "strerror", None) or exc)
            else:
                if result:
                    answers[host] = result
                else:
                    failures[host] = "no addresses"
        with self._lock:
            changed = any(self._answers.get(h) != a for h, a in answers.items())
            self._answers.update(answers)
            self._failures = failures
            self.refreshed_at = self.clock()
        if changed:
            self._save()

    def _load(self) -> dict[str, tuple[IPNetwork, ...]]:
        if self._path is None:
            return {}
        try:
            data = json.loads(self._path.read_text(encoding="utf-8"))
            return {h: tuple(ipaddress.ip_network(n) for n in nets)
                    for h, nets in data.items() if h in self.hosts}
        except (OSError, ValueError, AttributeError, TypeError):
            return {}

    def _save(self) -> None:
        if self._path is None:
            return
        with self._lock:
            data = {h: [str(n) for n in nets] for h, nets in self._answers.items()}
        tmp = self._path.with_suffix(f".tmp.{os.getpid()}")
        with contextlib.suppress(OSError):  # a cache: losing it costs a lookup, no more
            self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
            os.replace(tmp, self._path)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
