from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent.errors import BusyError, StateError
from agent.journal import Journal
from agent.state import STATE_FORMAT, DesiredState, StateStore


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


def test_a_torn_last_line_is_skipped_and_said_and_the_next_append_is_whole(
        tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.append({"action": "isolate"})
    with open(journal.path, "ab") as fh:  # a crash in the middle of a write
        fh.write(b'{"action": "restore", "ti')
    tail = journal.tail(10)
    assert [e["action"] for e in tail.entries] == ["isolate"] and tail.skipped == 1
    journal.append({"action": "allow"})
    tail = journal.tail(10)
    assert [e["action"] for e in tail.entries] == ["isolate", "allow"] and tail.skipped == 1


def test_the_journal_rotates_with_a_bounded_history_and_reads_from_the_end(
        tmp_path: Path) -> None:
    journal = Journal(tmp_path, max_bytes=2000, keep=2)
    for i in range(200):
        journal.append({"action": "verify", "n": i, "pad": "x" * 50})
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["journal.jsonl", "journal.jsonl.1", "journal.jsonl.2"]
    assert all(p.stat().st_size < 2200 for p in tmp_path.iterdir())
    assert [e["n"] for e in journal.tail(3).entries] == [197, 198, 199]
    everything = journal.tail().entries
    assert everything[-1]["n"] == 199 and len(everything) < 200  # the oldest are gone
    assert [e["n"] for e in everything] == sorted(e["n"] for e in everything)
    cut = everything[-5]["time"]
    assert [e["n"] for e in journal.tail(since=cut).entries] == [196, 197, 198, 199]


def test_find_request_finds_the_latest_answer(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.append({"action": "isolate", "request_id": "c-1", "answer": {"ok": True}})
    journal.append({"action": "restore", "request_id": "c-10", "answer": {"ok": True}})
    found = journal.find_request("c-1")
    assert found is not None and found["action"] == "isolate"
    assert journal.find_request("c-2") is None


def test_a_state_file_of_a_newer_agent_is_refused_and_an_old_one_migrated(
        tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s")
    store.ensure_dir()
    store.state_path.write_text('{"profile": "full", "generation": 4}')  # 0.1: no format
    state = store.load()
    assert (state.profile, state.generation, state.format) == ("full", 4, STATE_FORMAT)
    newer = json.dumps({"format": STATE_FORMAT + 1, "profile": "full", "future": True})
    store.state_path.write_text(newer)
    with pytest.raises(StateError, match=r"newer agent.*Upgrade the agent"):
        store.load()
    assert store.state_path.read_text() == newer  # left as it is
