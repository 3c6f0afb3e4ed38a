"""The RPC dispatcher: every malformed request gets an error response and changes nothing.
The nft edge is replaced by a recorder here; the lab tests run the real thing."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from agent.engine import Engine
from agent.rpc import MAX_LINE_BYTES, Dispatcher, read_lines
from agent.version import package_version
from tests.unit.conftest import make_config
from tests.unit.fakes import RecordingNft, no_reference


@pytest.fixture
def rig(tmp_path: Path) -> tuple[Dispatcher, RecordingNft, Path]:
    nft = RecordingNft()
    engine = Engine(make_config(tmp_path), nft=nft, references=no_reference)  # type: ignore[arg-type]
    return Dispatcher(engine), nft, tmp_path / "state"


def call(d: Dispatcher, obj: Any) -> dict[str, Any]:
    line = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return d.handle_line(line)


@pytest.mark.parametrize(
    ("line", "code", "fragment"),
    [
        (b"{not json", "bad_json", "not valid JSON"),
        (b"[1, 2]", "bad_request", "request"),
        (b'{"v": 2, "op": "status"}', "unsupported_version", "v1"),
        (b'{"v": 1, "op": "format_disk"}', "bad_request", "op"),
        (b'{"v": 1, "op": "isolate", "args": {"reason": ""}}', "bad_request", "reason"),
        (b'{"v": 1, "op": "isolate", "args": {"reason": "x", "profile": "a;b"}}',
         "bad_request", "profile"),
        (b'{"v": 1, "op": "isolate", "args": {"reason": "x", "profile": "nope"}}',
         "bad_request", "unknown profile"),
        (b'{"v": 1, "op": "isolate", "args": {"reason": "x", "actor": "$(reboot)"}}',
         "bad_request", "actor"),
        (b'{"v": 1, "op": "allow", "args": {"cidr": "10.0.0.0/33", "proto": "tcp", '
         b'"duration_seconds": 60, "reason": "x"}}', "bad_request", "cidr"),
        (b'{"v": 1, "op": "allow", "args": {"cidr": "10.0.0.0/8", "proto": "tcp", '
         b'"duration_seconds": -5, "reason": "x"}}', "bad_request", "duration_seconds"),
        (b'{"v": 1, "op": "restore", "args": {"reason": "a\\nb"}}', "bad_request",
         "control or bidi"),
        (b'{"v": 1, "op": "status", "args": {"extra": 1}}', "bad_request", "extra"),
        (b'{"v": 1, "id": "' + b"x" * 100 + b'", "op": "status"}', "bad_request", "id"),
    ],
)
def test_bad_requests_get_errors_and_change_nothing(
    rig: tuple[Dispatcher, RecordingNft, Path], line: bytes, code: str, fragment: str
) -> None:
    dispatcher, nft, state_dir = rig
    reply = call(dispatcher, line)
    assert reply["ok"] is False
    assert reply["error"]["code"] == code
    assert fragment in reply["error"]["message"]
    assert nft.calls == []
    assert not (state_dir / "state.json").exists()


def test_oversize_line_is_refused(rig: tuple[Dispatcher, RecordingNft, Path]) -> None:
    dispatcher, nft, _ = rig
    reply = call(dispatcher, b"{" + b" " * MAX_LINE_BYTES + b"}")
    assert reply["error"]["code"] == "too_large"
    assert nft.calls == []


def test_read_lines_skips_the_rest_of_an_oversize_line() -> None:
    stream = io.BytesIO(b"a" * (MAX_LINE_BYTES * 3) + b"\n" + b'{"v":1}\n\n')
    lines = list(read_lines(stream))
    assert len(lines) == 2
    assert len(lines[0]) == MAX_LINE_BYTES + 1
    assert lines[1] == b'{"v":1}'


def test_id_is_echoed_and_ping_answers(rig: tuple[Dispatcher, RecordingNft, Path]) -> None:
    dispatcher, _, _ = rig
    reply = call(dispatcher, {"v": 1, "id": "c-7", "op": "ping"})
    assert reply == {"v": 1, "id": "c-7", "ok": True, "result": {
        "gateway": "gw-ams-1", "protocol": 1, "version": package_version(), "config_digest": "",
        "profiles": ["internet", "full", "casefiles"]}}


def test_failed_apply_restores_the_previous_desired_state(tmp_path: Path) -> None:
    from agent.errors import NftError

    class FailingNft(RecordingNft):
        def apply_file(self, path: str) -> None:
            raise NftError("Error: Could not process rule: No buffer space available")

    engine = Engine(make_config(tmp_path), nft=FailingNft(), references=no_reference)  # type: ignore[arg-type]
    reply = Dispatcher(engine).handle_line(
        b'{"v":1,"op":"isolate","args":{"reason":"drill"}}')
    assert reply["error"]["code"] == "nft_error"
    state = engine.store.load()
    assert state.profile is None and state.generation == 0
    journal = engine.store.read_journal()
    assert journal[-1]["result"] == "failed" and "No buffer space" in journal[-1]["error"]


def test_status_terse_for_polls(rig: tuple[Dispatcher, RecordingNft, Path]) -> None:
    """`{"elements": false}` (controller polls) skips reading back set contents; the
    plain request (older controllers, the CLI) reads them as before."""
    d, nft, _ = rig
    assert call(d, {"v": 1, "id": "a", "op": "status", "args": {"elements": False}})["ok"]
    assert call(d, {"v": 1, "id": "b", "op": "status"})["ok"]
    assert nft.calls[-2:] == ["read-terse", "read"]
    bad = call(d, {"v": 1, "id": "c", "op": "status", "args": {"elements": "maybe"}})
    assert bad["error"]["code"] == "bad_request"


def test_a_repeated_request_id_gets_the_first_answer_and_applies_once(
        rig: tuple[Dispatcher, RecordingNft, Path]) -> None:
    d, nft, _ = rig
    audit = "ab" * 32
    request = {"v": 1, "id": "cmd-42", "op": "isolate", "audit": audit,
               "args": {"profile": "full", "reason": "CSIRT warning", "actor": "olga"}}
    first = call(d, request)
    applies = nft.calls.count("apply")
    again = call(d, request)
    assert nft.calls.count("apply") == applies, "the repeat applied again"
    assert again["result"]["replayed"] is True and first["result"].get("replayed") is False
    assert {k: v for k, v in again["result"].items() if k != "replayed"} == \
        {k: v for k, v in first["result"].items() if k != "replayed"}
    [entry] = [e for e in d.engine.store.read_journal() if e.get("request_id") == "cmd-42"]
    assert entry["audit"] == audit and entry["action"] == "isolate"
    # one id names one request
    other = {**request, "args": {**request["args"], "profile": "internet"}}
    conflict = call(d, other)
    assert conflict["error"]["code"] == "conflict" and "different request" in \
        conflict["error"]["message"]
    assert d.engine.store.load().profile == "full"
    # the journal op shows ids and audit hashes, not the stored answers
    shown = call(d, {"v": 1, "id": "j", "op": "journal", "args": {"limit": 5}})["result"]
    assert shown["entries"][-1]["request_id"] == "cmd-42"
    assert "answer" not in shown["entries"][-1] and shown["skipped_lines"] == 0


def test_a_failed_request_repeated_is_answered_with_the_same_error(tmp_path: Path) -> None:
    from agent.errors import NftError

    class FailingNft(RecordingNft):
        def apply_file(self, path: str) -> None:
            self.calls.append("apply")
            raise NftError("Error: Could not process rule: No buffer space available")

    nft = FailingNft()
    d = Dispatcher(Engine(make_config(tmp_path), nft=nft, references=no_reference))  # type: ignore[arg-type]
    line = b'{"v":1,"id":"c-9","op":"isolate","args":{"reason":"drill"}}'
    assert d.handle_line(line)["error"]["code"] == "nft_error"
    assert d.handle_line(line)["error"]["code"] == "nft_error"
    assert nft.calls.count("apply") == 1


def test_checkpoints_are_journaled(rig: tuple[Dispatcher, RecordingNft, Path]) -> None:
    d, _, _ = rig
    cp = {"seq": 17, "head_hash": "cd" * 32, "time": 1.5e9, "signature": "c2lnbmF0dXJl",
          "key_id": "k1"}
    assert call(d, {"v": 1, "id": "cp-1", "op": "checkpoint", "args": cp})["result"][
        "recorded"] is True
    entry = d.engine.store.read_journal()[-1]
    assert (entry["action"], entry["seq"], entry["head_hash"]) == ("checkpoint", 17, "cd" * 32)
    bad = call(d, {"v": 1, "op": "checkpoint", "args": {**cp, "head_hash": "x; rm -rf"}})
    assert bad["error"]["code"] == "bad_request"
