"""What runs inside the lab's namespaces: commands, echo services, sshd, and the
traffic checks (probe processes) the tests ask for; and stopping it all.

A mixin of :class:`drawbridge_lab.topology.Lab`: the attributes it uses are the
lab's, declared here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .layout import Gateway
from .netns import LabError
from .sshd import PRIVSEP_DIR, SSHD, render_sshd_config
from .stream import LineReader, Stream

HERE = Path(__file__).resolve().parent
ECHO = HERE / "echo.py"
PROBE = HERE / "probe.py"
# Helpers are standard-library scripts run by path: -I -S skips site setup (fast start).
PY = (sys.executable, "-I", "-S")

OUTSIDE_TCP_PORTS = (80, 443, 8443)
OUTSIDE_UDP_PORTS = (53, 5353)
INTERNAL_TCP_PORTS = (80,)
INTERNAL_UDP_PORTS = (5353,)
GATEWAY_TCP_PORTS = (8443,)  # "its VPN"
GATEWAY_UDP_PORTS = (5353,)


def _succeeds(argv: Sequence[str], timeout: float) -> bool:
    """Whether ``argv`` (a check that gives up after ``timeout``) exits 0 in time."""
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout + 5.0, check=False)
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


class Processes:
    """Starting processes in the lab's namespaces, checking traffic between them."""

    gateways: tuple[Gateway, ...]
    outside_ns: str
    workdir: Path
    keep: bool
    _procs: list[subprocess.Popen[Any]]
    _streams: list[Stream]

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
        argv = ["ip", "netns", "exec", src_ns, *PY, str(PROBE), *args, "--timeout", str(timeout)]
        return _succeeds(argv, timeout)

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
        argv = ["ip", "netns", "exec", src_ns, "ping", "-nq", "-c", "1", "-W", wait, dst_addr]
        return _succeeds(argv, timeout)

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

    # ------------------------------------------------------------ stopping

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

