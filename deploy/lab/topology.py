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
address plan is in :mod:`drawbridge_lab.addressing`.

Nothing outside the lab's own namespaces is touched: veth pairs are created
directly inside them, sysctls are written inside them, traffic flows between
them only. Teardown runs from ``destroy()``, the context manager, an atexit
hook and SIGTERM/SIGINT/SIGHUP handlers (installed on first use, chained to
the previous handlers).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from . import addressing as plan
from .netns import (
    DEFAULT_PREFIX,
    LabError,
    delete_namespaces,
    finish_ip_batch,
    ip_batch,
    list_namespaces,
    pid_alive,
    run_id_pattern,
    start_ip_batch,
    state_dir,
)
from .sshd import PRIVSEP_DIR, SSHD, render_sshd_config
from .stream import LineReader, Stream

__all__ = [
    "GATEWAY_TCP_PORTS",
    "GATEWAY_UDP_PORTS",
    "INTERNAL_TCP_PORTS",
    "INTERNAL_UDP_PORTS",
    "OUTSIDE_TCP_PORTS",
    "OUTSIDE_UDP_PORTS",
    "Gateway",
    "Lab",
    "LabError",
    "Stream",
    "cleanup_stale",
    "remove_lab",
]

HERE = Path(__file__).resolve().parent
ECHO = HERE / "echo.py"
PROBE = HERE / "probe.py"
NSCTL = HERE / "nsctl.py"
# Helpers are standard-library scripts run by path: -I -S skips site setup (fast start).
PY = (sys.executable, "-I", "-S")

OUTSIDE_TCP_PORTS = (80, 443, 8443)
OUTSIDE_UDP_PORTS = (53, 5353)
INTERNAL_TCP_PORTS = (80,)
INTERNAL_UDP_PORTS = (5353,)
GATEWAY_TCP_PORTS = (8443,)  # "its VPN"
GATEWAY_UDP_PORTS = (5353,)

# Interface names inside the namespaces (identical in every gateway namespace).
GW_INSIDE_IF = "inside"
GW_INSIDE2_IF = "inside2"
GW_OUTSIDE_IF = "outside"
GW_MGMT_IF = "mgmt"
HOST_IF = "eth0"
BRIDGE_IF = "br0"


@dataclasses.dataclass(frozen=True, slots=True)
class Gateway(plan.GatewayAddresses):
    """One gateway namespace with its two internal hosts (addresses: see addressing)."""

    name: str  # "gw0": the role, without the run prefix
    ns: str
    internal_ns: str
    internal2_ns: str
    inside_if: str = GW_INSIDE_IF
    inside2_if: str = GW_INSIDE2_IF
    outside_if: str = GW_OUTSIDE_IF
    mgmt_if: str = GW_MGMT_IF


# ---------------------------------------------------------------- teardown on exit

_live: set[Lab] = set()
_previous_handlers: dict[int, Any] = {}
_hooks_installed = False
_TEARDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _destroy_live() -> None:
    me = os.getpid()
    for lab in list(_live):
        if lab.owner_pid == me:  # a forked child exiting must not tear down its parent's lab
            lab.destroy()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _destroy_live()
    previous = _previous_handlers.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:  # default action: die of the signal as usual
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_teardown_hooks() -> None:
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_destroy_live)
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread; atexit still holds
    for signum in _TEARDOWN_SIGNALS:
        previous = signal.getsignal(signum)
        if previous is _on_signal or previous == signal.SIG_IGN:
            continue  # an ignored signal does not end the process: nothing to clean up
        _previous_handlers[signum] = previous
        signal.signal(signum, _on_signal)


# ---------------------------------------------------------------- the lab


class Lab:
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
        self.gateways = tuple(
            Gateway(
                **{
                    f.name: getattr(plan.gateway_addresses(i), f.name)
                    for f in dataclasses.fields(plan.GatewayAddresses)
                },
                name=f"gw{i}",
                ns=f"{prefix}gw{i}",
                internal_ns=f"{prefix}int{i}",
                internal2_ns=f"{prefix}int{i}b",
            )
            for i in range(gateways)
        )
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
            _live.add(lab)
            _install_teardown_hooks()
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

    def _sysctls(self) -> dict[str, dict[str, str]]:
        base = {
            "net/ipv6/conf/all/accept_dad": "0",
            "net/ipv6/conf/default/accept_dad": "0",
            "net/ipv4/conf/all/rp_filter": "0",
            "net/ipv4/conf/default/rp_filter": "0",
        }
        router = {
            **base,
            "net/ipv4/ip_forward": "1",
            "net/ipv6/conf/all/forwarding": "1",
        }
        host = {**base, "net/ipv4/ip_forward": "0", "net/ipv6/conf/all/forwarding": "0"}
        out: dict[str, dict[str, str]] = {}
        for gw in self.gateways:
            out[gw.ns] = router
            out[gw.internal_ns] = host
            out[gw.internal2_ns] = host
        # The internet routes between sites, without ICMP redirects on its bridge.
        out[self.outside_ns] = {
            **router,
            "net/ipv4/conf/all/send_redirects": "0",
            "net/ipv4/conf/default/send_redirects": "0",
        }
        out[self.mgmt_ns] = host
        return out

    def _links(self) -> list[str]:
        """veth pairs, created directly inside the namespaces.

        Every end gets an ifindex unique in the lab: the kernel treats a veth
        carrier change as urgent only when the two ends' ifindexes differ, and
        in fresh namespaces both ends would otherwise be ifindex 2, delaying
        IPv6 readiness by up to a second.
        """
        lines = []
        index = 10
        for gw in self.gateways:
            for dev, peer, peer_ns in (
                (GW_INSIDE_IF, HOST_IF, gw.internal_ns),
                (GW_INSIDE2_IF, HOST_IF, gw.internal2_ns),
                (GW_OUTSIDE_IF, gw.name, self.outside_ns),
                (GW_MGMT_IF, gw.name, self.mgmt_ns),
            ):
                lines.append(
                    f"link add {dev} index {index} netns {gw.ns} type veth"
                    f" peer name {peer} index {index + 1} netns {peer_ns}"
                )
                index += 2
        return lines

    def _config(self) -> dict[str, list[str]]:
        """``ip -batch`` lines per namespace (addresses, links up, routes)."""

        def iface(dev: str, addr4: str, addr6: str, plen6: int = 64) -> list[str]:
            return [
                f"addr add {addr4}/24 dev {dev}",
                f"addr add {addr6}/{plen6} dev {dev} nodad",
                f"link set {dev} up",
            ]

        cfg: dict[str, list[str]] = {}
        for gw in self.gateways:
            cfg[gw.ns] = [
                "link set lo up",
                *iface(GW_INSIDE_IF, gw.inside_addr4, gw.inside_addr6),
                *iface(GW_INSIDE2_IF, gw.inside2_addr4, gw.inside2_addr6),
                *iface(GW_OUTSIDE_IF, gw.outside_addr4, gw.outside_addr6),
                *iface(GW_MGMT_IF, gw.mgmt_addr4, gw.mgmt_addr6),
                f"route add default via {self.outside_addr4}",
                f"route add ::/0 via {self.outside_addr6}",
            ]
            for ns, a4, a6, gw4, gw6 in (
                (gw.internal_ns, gw.internal_host4, gw.internal_host6,
                 gw.inside_addr4, gw.inside_addr6),
                (gw.internal2_ns, gw.internal2_host4, gw.internal2_host6,
                 gw.inside2_addr4, gw.inside2_addr6),
            ):  # fmt: skip
                cfg[ns] = [
                    "link set lo up",
                    *iface(HOST_IF, a4, a6),
                    f"route add default via {gw4}",
                    f"route add ::/0 via {gw6}",
                ]
        for ns, a4, a6 in (
            (self.outside_ns, self.outside_addr4, self.outside_addr6),
            (self.mgmt_ns, self.mgmt_addr4, self.mgmt_addr6),
        ):
            lines = ["link set lo up"]
            if len(self.gateways) > 1:
                lines.append(f"link add {BRIDGE_IF} type bridge stp_state 0 mcast_snooping 0")
                for gw in self.gateways:
                    lines += [f"link set {gw.name} master {BRIDGE_IF}", f"link set {gw.name} up"]
                lines += iface(BRIDGE_IF, a4, a6)
            else:
                lines += iface(self.gateways[0].name, a4, a6)
            cfg[ns] = lines
        for gw in self.gateways:  # the internet knows the way back to each site (no NAT)
            net4, net6 = gw.internal_networks
            cfg[self.outside_ns] += [
                f"route add {net4} via {gw.outside_addr4}",
                f"route add {net6} via {gw.outside_addr6}",
            ]
        return cfg

    def _build(self, *, services: bool) -> None:
        names = self.namespaces
        existing = set(list_namespaces(self.prefix))
        if existing:
            raise LabError(f"namespaces with prefix {self.prefix} exist already: {existing}")
        ip_batch([f"netns add {n}" for n in names])
        self._nsctl(["sysctl"], input_text=json.dumps(self._sysctls()))
        pending: list[subprocess.Popen[Any]] = []
        if services:
            pending = self._start_default_services()
        ip_batch(self._links())
        cfg = self._config()
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

    # ------------------------------------------------------------ processes

    def run(
        self,
        ns: str,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float | None = 30.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in namespace ``ns`` (``ip netns exec``), capture text output."""
        return subprocess.run(
            ["ip", "netns", "exec", ns, *argv],
            input=input,
            # never the test runner's own stdin (some tools refuse a non-blocking one)
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def popen(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``ns`` in its own process group; destroy() kills the group."""
        kwargs.setdefault("start_new_session", True)
        proc: subprocess.Popen[Any] = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kwargs)
        self._procs.append(proc)
        return proc

    def start_services(
        self,
        ns: str | Sequence[str],
        *,
        tcp: Sequence[int] = (),
        udp: Sequence[int] = (),
        timeout: float = 10.0,
    ) -> subprocess.Popen[Any]:
        """Start one echo server for namespace(s) ``ns``; return once every socket listens.

        TCP ports echo bytes back, UDP ports echo datagrams, IPv4 and IPv6 on all
        addresses. One process serves all the given namespaces.
        """
        proc = self._start_echo([ns] if isinstance(ns, str) else list(ns), tcp, udp)
        self._wait_ready(proc, timeout=timeout)
        return proc

    def _start_default_services(self) -> list[subprocess.Popen[Any]]:
        internal = [n for gw in self.gateways for n in (gw.internal_ns, gw.internal2_ns)]
        return [
            self._start_echo([self.outside_ns], OUTSIDE_TCP_PORTS, OUTSIDE_UDP_PORTS),
            self._start_echo(internal, INTERNAL_TCP_PORTS, INTERNAL_UDP_PORTS),
            self._start_echo([gw.ns for gw in self.gateways], GATEWAY_TCP_PORTS, GATEWAY_UDP_PORTS),
        ]

    def _start_echo(
        self, namespaces: Sequence[str], tcp: Sequence[int], udp: Sequence[int]
    ) -> subprocess.Popen[Any]:
        if not namespaces:
            raise ValueError("no namespace given")
        argv = [*PY, str(ECHO)]
        if tcp:
            argv += ["--tcp", ",".join(str(p) for p in tcp)]
        if udp:
            argv += ["--udp", ",".join(str(p) for p in udp)]
        for extra in namespaces[1:]:
            argv += ["--netns", extra]
        if not self.keep:
            argv.append("--watch-stdin")  # dies with us even after a SIGKILL
        log = open(self.workdir / f"echo-{namespaces[0]}.log", "ab")  # noqa: SIM115
        try:
            return self.popen(
                namespaces[0],
                argv,
                stdin=subprocess.DEVNULL if self.keep else subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        finally:
            log.close()

    def _wait_ready(self, proc: subprocess.Popen[Any], *, timeout: float) -> None:
        assert proc.stdout is not None
        line = LineReader(proc.stdout.fileno()).readline(timeout)
        proc.stdout.close()
        if line != "READY":
            logs = sorted(self.workdir.glob("echo-*.log"))
            detail = " ".join(p.read_text(errors="replace")[-500:] for p in logs)
            raise LabError(f"echo server {proc.args!r} did not start: {detail.strip()}")

    def start_sshd(
        self,
        ns: str,
        listen_addr: str,
        port: int = 22,
        *,
        host_key_path: str | os.PathLike[str],
        authorized_keys_path: str | os.PathLike[str],
        workdir: str | os.PathLike[str],
        include_dir: str | os.PathLike[str] | None = None,
        timeout: float = 10.0,
    ) -> subprocess.Popen[Any]:
        """Run ``sshd -D -e`` in ``ns`` with its own config in ``workdir``; wait for TCP.

        The log (sshd's stderr) goes to ``workdir/sshd.log``; the config is
        ``workdir/sshd_config``, reading ``include_dir/*.conf`` first if given.
        SIGHUP makes sshd read it again.
        """
        work = Path(workdir)
        work.mkdir(parents=True, exist_ok=True)
        key = Path(host_key_path)
        key.chmod(0o600)  # sshd refuses a host key that others can read
        config = work / "sshd_config"
        config.write_text(
            render_sshd_config(
                listen_addr=listen_addr,
                port=port,
                host_key_path=key,
                authorized_keys_path=Path(authorized_keys_path),
                workdir=work,
                include_dir=Path(include_dir) if include_dir is not None else None,
            )
        )
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        log_path = work / "sshd.log"
        with open(log_path, "ab") as log:
            proc = self.popen(
                ns,
                [SSHD, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if self.banner_ok(ns, listen_addr, port, "SSH-", timeout=0.5):
                return proc
            time.sleep(0.05)
        self._terminate([proc])
        tail = log_path.read_text(errors="replace")[-2000:]
        raise LabError(f"sshd in {ns} on {listen_addr}:{port} did not come up: {tail}")

    # ------------------------------------------------------------ traffic checks

    def _probe(self, src_ns: str, args: Sequence[str], timeout: float) -> bool:
        try:
            proc = subprocess.run(
                ["ip", "netns", "exec", src_ns, *PY, str(PROBE), *args, "--timeout", str(timeout)],
                capture_output=True,
                timeout=timeout + 5.0,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0

    def tcp_ok(self, src_ns: str, dst_addr: str, port: int, *, timeout: float = 1.0) -> bool:
        """Connect from ``src_ns`` and get one line echoed back within ``timeout``."""
        return self._probe(src_ns, ["tcp", dst_addr, str(port)], timeout)

    def udp_ok(self, src_ns: str, dst_addr: str, port: int, *, timeout: float = 1.0) -> bool:
        """Send a datagram from ``src_ns`` and get it echoed back within ``timeout``."""
        return self._probe(src_ns, ["udp", dst_addr, str(port)], timeout)

    def banner_ok(
        self, src_ns: str, dst_addr: str, port: int, prefix: str = "SSH-", *, timeout: float = 1.0
    ) -> bool:
        """Connect from ``src_ns`` and read a greeting starting with ``prefix``."""
        return self._probe(src_ns, ["banner", dst_addr, str(port), prefix], timeout)

    def ping_ok(self, src_ns: str, dst_addr: str, *, timeout: float = 1.0) -> bool:
        """One ICMP / ICMPv6 echo from ``src_ns`` answered within ``timeout`` (>= 1 s)."""
        wait = str(max(1, round(timeout)))
        try:
            proc = subprocess.run(
                ["ip", "netns", "exec", src_ns, "ping", "-nq", "-c", "1", "-W", wait, dst_addr],
                capture_output=True,
                timeout=timeout + 5.0,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0

    def check_many(
        self,
        checks: Iterable[tuple[str, str, str, int]],
        *,
        timeout: float = 1.0,
        parallel: int = 16,
    ) -> list[bool]:
        """Run many ``(kind, src_ns, dst_addr, port)`` checks concurrently, in order.

        ``kind`` is ``tcp``, ``udp`` or ``icmp`` (port ignored); for 50-gateway
        runs where one probe process at a time would take seconds.
        """

        def one(check: tuple[str, str, str, int]) -> bool:
            kind, src, dst, port = check
            if kind == "tcp":
                return self.tcp_ok(src, dst, port, timeout=timeout)
            if kind == "udp":
                return self.udp_ok(src, dst, port, timeout=timeout)
            if kind == "icmp":
                return self.ping_ok(src, dst, timeout=timeout)
            raise ValueError(f"unknown check kind {kind!r}")

        with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            return list(pool.map(one, list(checks)))

    def open_stream(
        self,
        src_ns: str,
        dst_addr: str,
        port: int,
        *,
        timeout: float = 1.0,
        check: bool = True,
    ) -> Stream:
        """Open one TCP connection from ``src_ns`` to an echo port and keep it open.

        With ``check`` (default) a failed connect raises LabError; otherwise the
        returned stream has ``connected == False``.
        """
        proc = self.popen(
            src_ns,
            [*PY, str(PROBE), "stream", dst_addr, str(port), "--timeout", str(timeout)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        stream = Stream(proc, f"{src_ns} -> {dst_addr}:{port}", timeout)
        self._streams.append(stream)
        if check and not stream.connected:
            stream.close()
            raise LabError(f"stream {stream.description} did not connect: {stream.error}")
        return stream

    # ------------------------------------------------------------ teardown

    def _terminate(self, procs: Sequence[subprocess.Popen[Any]], grace: float = 1.0) -> None:
        running = [p for p in procs if p.poll() is None]
        for p in running:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in running:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=1.0)
        for p in procs:
            for pipe in (p.stdin, p.stdout, p.stderr):
                if pipe is not None and not pipe.closed:
                    with contextlib.suppress(OSError):
                        pipe.close()

    def destroy(self) -> None:
        """Kill every process this lab started or that lives in its namespaces, delete
        the namespaces and the work directory. Idempotent; safe from a signal handler."""
        self._terminate(self._procs)  # stream probes are among them
        delete_namespaces(self.namespaces)
        shutil.rmtree(self.workdir, ignore_errors=True)
        self._destroyed = True
        _live.discard(self)

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


# ---------------------------------------------------------------- leftovers


def _state_file(run_prefix: str) -> Path:
    return state_dir() / f"{run_prefix.rstrip('-')}.json"


def remove_lab(run_prefix: str) -> list[str]:
    """Remove a kept lab by its run prefix (namespaces, work directory, state file)."""
    names = list_namespaces(run_prefix)
    delete_namespaces(names)
    record = _state_file(run_prefix)
    try:
        workdir = json.loads(record.read_text()).get("workdir")
    except (OSError, ValueError):
        workdir = None
    if workdir and Path(workdir).name.startswith(run_prefix):
        shutil.rmtree(workdir, ignore_errors=True)
    record.unlink(missing_ok=True)
    return names


def cleanup_stale(prefix: str = DEFAULT_PREFIX, *, everything: bool = False) -> list[str]:
    """Delete namespaces of earlier, crashed runs; return the deleted names.

    A namespace ``<prefix><pid>-<hex>-<role>`` is stale when ``pid`` is dead and
    its run is not a kept lab recorded by ``drawbridge-lab up``. Labs of other,
    running processes are never touched. ``everything=True`` deletes every
    namespace starting with ``prefix`` (``drawbridge-lab down --all``).
    """
    pattern = run_id_pattern(prefix)
    stale: list[str] = []
    for name in list_namespaces(prefix):
        if everything:
            stale.append(name)
            continue
        m = pattern.match(name)
        if m is None or pid_alive(int(m["pid"])) or _state_file(m["run"]).exists():
            continue
        stale.append(name)
    if stale:
        delete_namespaces(stale)
        runs = {m["run"] for n in stale if (m := pattern.match(n))}
        for entry in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
            if any(entry.name.startswith(run) for run in runs):
                shutil.rmtree(entry, ignore_errors=True)
    return stale
