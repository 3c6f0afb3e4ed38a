"""Bad input to every CLI verb is refused with a clear message and changes nothing:
not the ruleset, not the state file, not the journal. With and without the daemon."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.lab.agent_rig import AGENT, AgentRig

pytestmark = pytest.mark.lab

BAD_COMMANDS: list[tuple[list[str], str]] = [
    (["isolate", "--profile", "nope", "--reason", "x"], "unknown profile 'nope'"),
    (["isolate", "--profile", "internet; flush ruleset", "--reason", "x"], "not a valid name"),
    (["isolate", "--profile", 'full" drop', "--reason", "x"], "not a valid name"),
    (["isolate", "--reason", ""], "a reason is required"),
    (["isolate", "--reason", "line1\nline2"], "control or bidi"),
    (["isolate", "--reason", "next\u0085line"], "U+0085"),
    (["isolate", "--reason", "all clear \u202eevil"], "U+202E"),
    (["isolate", "--reason", "x", "--actor", "$(reboot)"], "not a valid actor"),
    (["isolate", "--reason", "x" * 501], "at most 500"),
    (["restore", "--reason", "\x1b[31mred"], "control or bidi"),
    (["restore", "--reason", "\u009b31mred"], "U+009B"),
    (["allow", "--cidr", "1.2.3.0/24; flush ruleset", "--proto", "tcp", "--port", "443",
      "--for", "1h", "--reason", "x"], "not a valid IPv4/IPv6 CIDR"),
    (["allow", "--cidr", "10.0.0.1/8", "--proto", "tcp", "--port", "443", "--for", "1h",
      "--reason", "x"], "host bits set"),
    (["allow", "--cidr", "203.0.113.0/24", "--proto", "gre", "--for", "1h", "--reason", "x"],
     "proto"),
    (["allow", "--cidr", "203.0.113.0/24", "--proto", "tcp", "--port", "70000", "--for", "1h",
      "--reason", "x"], "outside 1-65535"),
    (["allow", "--cidr", "203.0.113.0/24", "--proto", "tcp", "--port", "443", "--for",
      "forever", "--reason", "x"], "not a duration"),
    (["allow", "--cidr", "203.0.113.0/24", "--proto", "icmp", "--port", "1", "--for", "1h",
      "--reason", "x"], "icmp has no ports"),
    (["allow", "--cidr", "203.0.113.0/24", "--proto", "tcp", "--for", "90d",
      "--reason", "x"], "duration_seconds"),
    (["render", "--profile", "../../etc/passwd"], "unknown profile"),
]


def snapshot(rig: AgentRig) -> tuple[str, bytes | None, str]:
    journal = rig.state_dir / "journal.jsonl"
    return (rig.rules_as_meant(), rig.state_bytes(),
            journal.read_text() if journal.exists() else "")


@pytest.mark.parametrize("daemon", [False, True], ids=["break-glass", "via-daemon"])
def test_bad_input_changes_nothing(rig: AgentRig, daemon: bool) -> None:
    if daemon:
        rig.start_daemon()
    rig.cli("isolate", "--reason", "baseline", "--profile", "casefiles")
    before = snapshot(rig)
    for argv, message in BAD_COMMANDS:
        proc = rig.cli(*argv, check=False)
        assert proc.returncode == 2, (argv, proc.returncode, proc.stdout, proc.stderr)
        assert message in proc.stderr, (argv, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert snapshot(rig) == before, f"{argv} changed something"


def test_malformed_rpc_lines_get_errors_and_change_nothing(rig: AgentRig) -> None:
    rig.cli("isolate", "--reason", "baseline")
    before = snapshot(rig)
    lines = [b"{oops", b'{"v": 1, "op": "isolate", "args": {"profile": "a b", "reason": "x"}}',
             b'{"v": 9, "op": "status"}', b'{"v": 1, "op": "rm -rf /"}',
             b"x" * 70_000, b'{"v": 1, "id": "last", "op": "ping"}']
    proc = subprocess.run(
        ["ip", "netns", "exec", rig.gw.ns, AGENT, "-c", str(rig.config_path), "rpc"],
        input=b"\n".join(lines) + b"\n", capture_output=True, timeout=60, check=True)
    replies = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["ok"] for r in replies] == [False, False, False, False, False, True]
    assert [r.get("error", {}).get("code") for r in replies[:5]] == [
        "bad_json", "bad_request", "unsupported_version", "bad_request", "too_large"]
    assert replies[-1]["id"] == "last"
    assert snapshot(rig) == before

