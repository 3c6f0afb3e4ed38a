"""Labs that must not outlive this process, and leftovers of those that did.

Teardown of a live lab runs from its ``destroy()``, the context manager, an atexit
hook and SIGTERM/SIGINT/SIGHUP handlers (installed on first use, chained to the
previous handlers). Leftovers: a kept lab (``drawbridge-lab up``) is removed by its
run prefix (:func:`remove_lab`); namespaces of crashed runs by :func:`cleanup_stale`.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from .netns import (
    DEFAULT_PREFIX,
    delete_namespaces,
    list_namespaces,
    pid_alive,
    run_id_pattern,
    state_dir,
)

if TYPE_CHECKING:
    from .topology import Lab

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


def track(lab: Lab) -> None:
    """Destroy ``lab`` when this process exits or is killed by a signal."""
    _live.add(lab)
    _install_teardown_hooks()


def untrack(lab: Lab) -> None:
    _live.discard(lab)


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
