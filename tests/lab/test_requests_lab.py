"""Requests happen once: replayed ids, no-op repeats, no second path after a timeout.

With the real agent (CLI, forced command, daemon) in a lab gateway.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from typing import Any

import pytest

from tests.lab.agent_rig import AGENT, AgentRig, wait_for

pytestmark = pytest.mark.lab


def journal(rig: AgentRig) -> list[dict[str, Any]]:
    return [json.loads(line) for line in
            (rig.state_dir / "journal.jsonl").read_text().splitlines() if line.strip()]


def dropped(rig: AgentRig, counter: str = "dropped_forward") -> int:
    found = re.search(r"packets (\d+)", rig.nft("list", "counter", "inet", "drawbridge",
                                               counter))
    assert found
    return int(found.group(1))


def rpc(rig: AgentRig, *lines: dict[str, Any]) -> list[dict[str, Any]]:
    """The SSH forced command, fed on stdin as sshd would."""
    proc = subprocess.run(
        ["ip", "netns", "exec", rig.gw.ns, AGENT, "-c", str(rig.config_path), "rpc"],
        input="".join(json.dumps(line) + "\n" for line in lines), capture_output=True,
        text=True, timeout=120, check=True)
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.mark.parametrize("daemon", [False, True], ids=["break-glass", "daemon"])
def test_a_replayed_request_id_applies_once(rig: AgentRig, daemon: bool) -> None:
    if daemon:
        rig.start_daemon()
    first = rig.cli("--request-id", "inc-7-isolate", "isolate", "--reason", "precaution",
                    "--json")
    again = rig.cli("--request-id", "inc-7-isolate", "isolate", "--reason", "precaution",
                    "--json")
    a, b = json.loads(first.stdout), json.loads(again.stdout)
    assert (a["replayed"], b["replayed"]) == (False, True)
    assert a["generation"] == b["generation"]
    # the forced command: the controller repeating its command after a lost answer
    line = {"v": 1, "id": "cmd-1234", "op": "allow", "audit": "0f" * 32, "args": {
        "cidr": f"{rig.lab.outside_addr4}/32", "proto": "tcp", "ports": [443],
        "duration_seconds": 600, "reason": "chain partner", "actor": "olga"}}
    answers = rpc(rig, line, line)
    assert [r["ok"] for r in answers] == [True, True]
    assert answers[1]["result"]["replayed"] and not answers[0]["result"]["replayed"]
    assert len(rig.status()["exceptions"]) == 1, "the exception was opened twice"
    ids = [e.get("request_id") for e in journal(rig) if e["action"] in ("isolate", "allow")]
    assert ids == ["inc-7-isolate", "cmd-1234"]
    [allow] = [e for e in journal(rig) if e["action"] == "allow"]
    assert allow["audit"] == "0f" * 32
    # a different request under a used id is refused, and changes nothing
    refused = rig.cli("--request-id", "inc-7-isolate", "isolate", "--profile", "internet",
                      "--reason", "something else", check=False)
    assert refused.returncode == 2 and "different request" in refused.stderr
    assert rig.status()["profile"] == "internet" and rig.status()["generation"] == \
        b["generation"] + 1  # internet (the default) was the first request; allow came after


def test_repeating_the_state_in_force_changes_nothing(rig: AgentRig) -> None:
    lab, gw = rig.lab, rig.gw
    rig.cli("isolate", "--profile", "full", "--reason", "precaution")
    assert not lab.tcp_ok(gw.internal_ns, lab.outside_addr4, 443)  # counted as dropped
    drops, generation = dropped(rig), rig.status()["generation"]
    again = json.loads(rig.cli("isolate", "--profile", "full", "--reason", "again",
                               "--json").stdout)
    assert again["changed"] is False and again["generation"] == generation
    assert dropped(rig) >= drops > 0, "a no-op must not reset the counters"
    assert journal(rig)[-1]["result"] == "noop"
    status = rig.status()
    assert status["generation"] == generation and status["reason"] == "precaution"
    rig.cli("restore", "--reason", "over")
    restored = json.loads(rig.cli("restore", "--reason", "over again", "--json").stdout)
    assert restored["changed"] is False and journal(rig)[-1]["result"] == "noop"


def test_a_silent_daemon_is_never_bypassed(rig: AgentRig) -> None:
    """A daemon that stops answering may still apply what it was sent: the CLI must not
    run the request a second time on its own, and a repeat under the same id is safe."""
    daemon = rig.start_daemon()
    os.killpg(daemon.pid, signal.SIGSTOP)
    try:
        before = rig.state_bytes()
        proc = rig.cli("--timeout", "2", "--request-id", "slow-1", "isolate", "--reason",
                       "while the daemon hangs", check=False)
        assert proc.returncode == 1 and "may have been applied" in proc.stderr
        assert rig.state_bytes() == before and not rig.has_table(), "the CLI went around"
    finally:
        os.killpg(daemon.pid, signal.SIGCONT)
    # the daemon wakes up and applies what it was sent; the repeat answers from memory
    wait_for(rig.has_table, 10, "the daemon to apply the request it had received")
    repeat = json.loads(rig.cli("--request-id", "slow-1", "isolate", "--reason",
                                "while the daemon hangs", "--json").stdout)
    assert repeat["replayed"] is True
    assert [e.get("request_id") for e in journal(rig) if e["action"] == "isolate"] == \
        ["slow-1"]
