"""Low-level named network namespace operations used by the lab (no side effects on import).

Everything here works on named namespaces under ``/run/netns`` (what ``ip netns``
manages) and never on the namespace of the calling process.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

NETNS_DIR = Path("/run/netns")
DEFAULT_PREFIX = "dbl-"
STATE_DIR_ENV = "DRAWBRIDGE_LAB_STATE_DIR"
DEFAULT_STATE_DIR = Path("/run/drawbridge-lab")


class LabError(RuntimeError):
    """A lab operation failed (the message says which command and why)."""


def state_dir() -> Path:
    """Where kept labs (``drawbridge-lab up``) are recorded."""
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


def list_namespaces(prefix: str = "") -> list[str]:
    """Names of the named network namespaces starting with ``prefix``, sorted."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def run_id_pattern(prefix: str) -> re.Pattern[str]:
    """Match ``<prefix><pid>-<6 hex>-<role>`` and capture the run prefix and the pid."""
    return re.compile(rf"^(?P<run>{re.escape(prefix)}(?P<pid>\d+)-[0-9a-f]{{6}}-)(?P<role>.+)$")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ip_batch(lines: Sequence[str], *, ns: str | None = None, force: bool = False) -> None:
    """Run ``ip [-n NS] [-force] -batch -`` with ``lines``; LabError with ip's stderr."""
    if not lines:
        return
    argv = ["ip"]
    if ns is not None:
        argv += ["-n", ns]
    if force:
        argv.append("-force")
    argv += ["-batch", "-"]
    proc = subprocess.run(
        argv, input="\n".join(lines) + "\n", capture_output=True, text=True, check=False
    )
    if proc.returncode != 0 and not force:
        where = f" in {ns}" if ns else ""
        raise LabError(f"ip batch{where} failed: {proc.stderr.strip()}")


def start_ip_batch(lines: Sequence[str], *, ns: str) -> subprocess.Popen[str]:
    """Start ``ip -n NS -batch -`` fed with ``lines``; finish with :func:`finish_ip_batch`."""
    proc = subprocess.Popen(
        ["ip", "-n", ns, "-batch", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc


def finish_ip_batch(proc: subprocess.Popen[str], lines: Sequence[str], ns: str) -> None:
    _, err = proc.communicate("\n".join(lines) + "\n", timeout=30)
    if proc.returncode != 0:
        raise LabError(f"ip batch in {ns} failed: {err.strip()}")


def namespace_pids(names: Iterable[str]) -> set[int]:
    """Pids of processes whose network namespace is one of the named namespaces."""
    wanted: set[tuple[int, int]] = set()
    for name in names:
        try:
            st = os.stat(NETNS_DIR / name)
        except OSError:
            continue
        wanted.add((st.st_dev, st.st_ino))
    if not wanted:
        return set()
    me = os.getpid()
    pids: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            st = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in wanted:
            pids.add(int(entry.name))
    return pids


def kill_pids(pids: Iterable[int], *, grace: float = 1.0) -> None:
    """SIGTERM ``pids``, SIGKILL whatever still lives after ``grace`` seconds."""
    alive = set(pids)
    for pid in list(alive):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            alive.discard(pid)
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        time.sleep(0.01)
        for pid in list(alive):
            if not _running(pid):
                alive.discard(pid)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    """True unless ``pid`` is gone or a zombie (a zombie child of ours counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def delete_namespaces(names: Sequence[str], *, kill: bool = True) -> None:
    """Kill the processes living in ``names`` (optional) and delete the namespaces."""
    present = [n for n in names if (NETNS_DIR / n).exists()]
    if not present:
        return
    if kill:
        kill_pids(namespace_pids(present))
    ip_batch([f"netns del {n}" for n in present], force=True)
