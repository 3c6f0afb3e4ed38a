"""The Drawbridge namespace lab: gateways, internal hosts, "the internet", a management net.

::

    with Lab.create(gateways=1) as lab:
        gw = lab.gateways[0]
        assert lab.tcp_ok(gw.internal_ns, lab.outside_addr4, 443)

``Lab.create`` builds, per gateway ``i``, the namespaces ``<run>gw{i}`` (the
gateway: forwarding on), ``<run>int{i}`` and ``<run>int{i}b`` (internal hosts
on two internal subnets, default routes via the gateway), plus one
``<run>outside`` (the internet stand-in, routes back to every gateway's
internal networks, no NAT) and one ``<run>mgmt`` (controller / Prometheus
side, on every gateway's management interface). ``<run>`` is
``<prefix><pid>-<6 hex>-`` so that leftovers of a crashed run are recognised
(:func:`cleanup_stale` removes namespaces whose creating pid is dead). The
address plan is in :mod:`drawbridge_lab.addressing`, the names and the lines that
build the namespaces in :mod:`drawbridge_lab.layout`, what runs inside them (services,
sshd, traffic checks) in :mod:`drawbridge_lab.procs`.

Nothing outside the lab's own namespaces is touched: veth pairs are created
directly inside them, sysctls are written inside them, traffic flows between
them only. Teardown runs from ``destroy()``, the context manager, an atexit
hook and SIGTERM/SIGINT/SIGHUP handlers (installed on first use, chained to
the previous handlers: :mod:`drawbridge_lab.teardown`, which also removes
leftovers).
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from . import addressing as plan
from . import teardown
from .layout import BRIDGE_IF, Gateway, ip_config, name_gateways, sysctls, veth_links
from .netns import (
    DEFAULT_PREFIX,
    LabError,
    delete_namespaces,
    finish_ip_batch,
    ip_batch,
    list_namespaces,
    start_ip_batch,
)
from .procs import (
    GATEWAY_TCP_PORTS,
    GATEWAY_UDP_PORTS,
    HERE,
    INTERNAL_TCP_PORTS,
    INTERNAL_UDP_PORTS,
    OUTSIDE_TCP_PORTS,
    OUTSIDE_UDP_PORTS,
    PROBE,
    PY,
    Processes,
)
from .stream import Stream
from .teardown import cleanup_stale, remove_lab

__all__ = [
    "GATEWAY_TCP_PORTS",
    "GATEWAY_UDP_PORTS",
    "INTERNAL_TCP_PORTS",
    "INTERNAL_UDP_PORTS",
    "OUTSIDE_TCP_PORTS",
    "OUTSIDE_UDP_PORTS",
    "PROBE",
    "PY",
    "Gateway",
    "Lab",
    "LabError",
    "Stream",
    "cleanup_stale",
    "remove_lab",
]

NSCTL = HERE / "nsctl.py"


# ---------------------------------------------------------------- the lab


class Lab(Processes):
    """A built lab (use :meth:`create`). Attributes are plain strings, see the docstring."""

    prefix: str
    gateways: tuple[Gateway, ...]
    outside_ns: str
    mgmt_ns: str
    outside_if: str
    mgmt_if: str
    workdir: Path
    keep: bool

    outside_addr4 = plan.OUTSIDE_HOST4
    outside_addr6 = plan.OUTSIDE_HOST6
    outside_subnet4 = plan.OUTSIDE_SUBNET4
    outside_subnet6 = plan.OUTSIDE_SUBNET6
    mgmt_addr4 = plan.MGMT_HOST4
    mgmt_addr6 = plan.MGMT_HOST6
    mgmt_subnet4 = plan.MGMT_SUBNET4
    mgmt_subnet6 = plan.MGMT_SUBNET6

    def __init__(self, prefix: str, gateways: int, *, keep: bool = False) -> None:
        if not 1 <= gateways <= plan.MAX_GATEWAYS:
            raise ValueError(f"gateways must be 1..{plan.MAX_GATEWAYS}, not {gateways}")
        self.prefix = prefix
        self.keep = keep
        self.owner_pid = os.getpid()
        self.gateways = name_gateways(prefix, gateways)
        self.outside_ns = f"{prefix}outside"
        self.mgmt_ns = f"{prefix}mgmt"
        self.outside_if = BRIDGE_IF if gateways > 1 else "gw0"
        self.mgmt_if = BRIDGE_IF if gateways > 1 else "gw0"
        self.workdir = Path(tempfile.mkdtemp(prefix=prefix))
        self.build_seconds = 0.0
        self._procs: list[subprocess.Popen[Any]] = []
        self._streams: list[Stream] = []
        self._destroyed = False

    # ------------------------------------------------------------ construction

    @classmethod
    def create(
        cls,
        gateways: int = 1,
        prefix: str | None = None,
        *,
        services: bool = True,
        keep: bool = False,
    ) -> Lab:
        """Build a lab with ``gateways`` gateways and start its echo services.

        ``prefix`` is the family prefix (default ``dbl-``); the run prefix adds the
        pid and 6 random hex digits. ``keep=True`` (used by ``drawbridge-lab up``)
        leaves the lab in place when this process exits: no atexit/signal
        teardown, services detached; remove it with :func:`remove_lab`.
        """
        family = DEFAULT_PREFIX if prefix is None else prefix
        run_prefix = f"{family}{os.getpid()}-{secrets.token_hex(3)}-"
        lab = cls(run_prefix, gateways, keep=keep)
        if not keep:
            teardown.track(lab)
        started = time.monotonic()
        try:
            lab._build(services=services)
        except BaseException:
            lab.destroy()
            raise
        lab.build_seconds = time.monotonic() - started
        return lab

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Every namespace of this lab (gateways, internal hosts, outside, mgmt)."""
        names: list[str] = []
        for gw in self.gateways:
            names += [gw.ns, gw.internal_ns, gw.internal2_ns]
        return (*names, self.outside_ns, self.mgmt_ns)

    def _build(self, *, services: bool) -> None:
        names = self.namespaces
        existing = set(list_namespaces(self.prefix))
        if existing:
            raise LabError(f"namespaces with prefix {self.prefix} exist already: {existing}")
        ip_batch([f"netns add {n}" for n in names])
        parts = (self.gateways, self.outside_ns, self.mgmt_ns)  # see layout
        self._nsctl(["sysctl"], input_text=json.dumps(sysctls(*parts)))
        pending: list[subprocess.Popen[Any]] = []
        if services:
            pending = self._start_default_services()
        ip_batch(veth_links(*parts))
        cfg = ip_config(*parts)
        batches = [(ns, lines, start_ip_batch(lines, ns=ns)) for ns, lines in cfg.items()]
        errors = []
        for ns, lines, proc in batches:
            try:
                finish_ip_batch(proc, lines, ns)
            except LabError as exc:
                errors.append(str(exc))
        if errors:
            raise LabError("; ".join(errors))
        self._nsctl(["wait-ready", "--timeout", "10", *names])
        for proc in pending:
            self._wait_ready(proc, timeout=10.0)

    def _nsctl(self, args: Sequence[str], input_text: str | None = None) -> None:
        proc = subprocess.run(
            [*PY, str(NSCTL), *args],
            input=input_text,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if proc.returncode != 0:
            raise LabError(f"nsctl {args[0]} failed: {proc.stderr.strip()}")


    # ------------------------------------------------------------ teardown

    def destroy(self) -> None:
        """Kill every process this lab started or that lives in its namespaces, delete
        the namespaces and the work directory. Idempotent; safe from a signal handler."""
        self._terminate(self._procs)  # stream probes are among them
        delete_namespaces(self.namespaces)
        shutil.rmtree(self.workdir, ignore_errors=True)
        self._destroyed = True
        teardown.untrack(self)

    @property
    def destroyed(self) -> bool:
        return self._destroyed

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    # ------------------------------------------------------------ description

    def describe(self) -> dict[str, Any]:
        """JSON-ready description: names, interfaces and addresses of everything."""
        return {
            "prefix": self.prefix,
            "pid": os.getpid(),
            "workdir": str(self.workdir),
            "namespaces": list(self.namespaces),
            "outside": {
                "ns": self.outside_ns,
                "if": self.outside_if,
                "addr4": self.outside_addr4,
                "addr6": self.outside_addr6,
                "subnet4": self.outside_subnet4,
                "subnet6": self.outside_subnet6,
                "tcp": list(OUTSIDE_TCP_PORTS),
                "udp": list(OUTSIDE_UDP_PORTS),
            },
            "mgmt": {
                "ns": self.mgmt_ns,
                "if": self.mgmt_if,
                "addr4": self.mgmt_addr4,
                "addr6": self.mgmt_addr6,
                "subnet4": self.mgmt_subnet4,
                "subnet6": self.mgmt_subnet6,
            },
            "gateways": [
                {**dataclasses.asdict(gw), "internal_networks": list(gw.internal_networks)}
                for gw in self.gateways
            ],
        }

    def __repr__(self) -> str:
        state = "destroyed" if self._destroyed else "live"
        return f"<Lab {self.prefix} gateways={len(self.gateways)} {state}>"

