from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.errors import BusyError, StateError
from agent.state import DesiredState, StateStore


def test_missing_state_means_open(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "s").load()
    assert state.profile is None and not state.isolated


def test_save_is_atomic_and_round_trips(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s")
    store.save(DesiredState(profile="full", actor="alice", reason="drill", generation=3))
    assert store.load().profile == "full"
    assert [p.name for p in store.dir.iterdir()] == ["state.json"]  # no temp files left
    assert oct(store.dir.stat().st_mode & 0o777) == "0o700"


def test_corrupt_state_is_reported_not_guessed(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s")
    store.ensure_dir()
    store.state_path.write_text('{"profile": 5}')
    with pytest.raises(StateError, match="corrupt"):
        store.load()


def test_journal_appends(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s")
    store.journal(action="isolate", actor="a", reason="r1")
    store.journal(action="restore", actor="b", reason="r2\nwith newline")
    entries = store.read_journal()
    assert [e["action"] for e in entries] == ["isolate", "restore"]
    assert len(store.journal_path.read_text().splitlines()) == 2
    assert store.read_journal(limit=1)[0]["actor"] == "b"


def test_lock_is_exclusive_across_processes(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s")
    with store.locked():
        pid = os.fork()
        if pid == 0:  # child: must not get the lock
            try:
                with StateStore(tmp_path / "s").locked(timeout=0.2):
                    os._exit(1)
            except BusyError:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
