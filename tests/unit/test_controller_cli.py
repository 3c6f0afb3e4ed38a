"""`drawbridge` against a real HTTP server (uvicorn on loopback) with in-memory agents."""

from __future__ import annotations

import csv
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from typer.testing import CliRunner

from controller.api import create_app
from controller.auth import Role
from controller.cli import app
from controller.service import Controller
from tests.storage import raw_sql
from tests.unit.test_controller_support import KEY_A, KEY_B, FakeFleet, make_controller, write_key


@pytest.fixture
def served(tmp_path: Path,
           db_url: str) -> Iterator[tuple[Controller, FakeFleet, str, dict[str, str]]]:
    fleet = FakeFleet(["gw0", "gw1", "gw2"])
    ctl = make_controller(tmp_path, fleet, db_url=db_url)
    tokens = {r.name: ctl.create_token(user=f"{r.name}-user", role=r, created_by="t",
                                       reason="t") for r in Role}
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(create_app(ctl), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield ctl, fleet, url, tokens
    server.should_exit = True
    thread.join(5)
    sock.close()
    ctl.close()


def run(url: str, token: str | None, *args: str) -> tuple[int, str]:
    env = {"DRAWBRIDGE_URL": url, "COLUMNS": "250"}
    if token:
        env["DRAWBRIDGE_TOKEN"] = token
    result = CliRunner().invoke(app, list(args), env=env)
    return result.exit_code, result.output


def test_isolate_restore_history_and_exit_codes(served) -> None:  # type: ignore[no-untyped-def]
    _ctl, fleet, url, tokens = served
    code, out = run(url, tokens["operator"], "isolate", "--all", "--reason", "CSIRT warning",
                    "--ticket", "INC-7")
    assert code == 0, out
    assert "verified" in out and "3 gateway(s)" in out
    fleet.agents["gw1"].up = False
    code, out = run(url, tokens["admin"], "restore", "--all", "--reason", "all clear",
                    "--json")
    assert code == 1
    result = json.loads(out)
    assert [r["outcome"] for r in result["results"]] == ["verified", "unreachable", "verified"]
    assert result["results"][1]["will_retry"] is True
    code, out = run(url, tokens["viewer"], "history", "--action", "isolate", "--json")
    records = json.loads(out)
    assert [(r["outcome"], r["actor"], r["reason"], r["ticket"]) for r in records] == [
        ("requested", "operator-user", "CSIRT warning", "INC-7"),
        ("ok", "operator-user", "CSIRT warning", "INC-7")]
    code, out = run(url, tokens["viewer"], "history", "--gateway", "gw1", "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert {"isolate", "restore", "gateway.add"} <= {r["action"] for r in rows}
    assert all("gw1" in r["targets"].split() for r in rows)
    code, out = run(url, tokens["viewer"], "history", "--since", "1h")
    assert code == 0 and "CSIRT warning" in out
    code, out = run(url, tokens["viewer"], "status")
    assert code == 1 and "DOWN" in out  # gw1 unreachable


def test_unverified_exit_code(served) -> None:  # type: ignore[no-untyped-def]
    _ctl, fleet, url, tokens = served
    fleet.agents["gw2"].verified = False
    code, out = run(url, tokens["operator"], "isolate", "gw2", "--reason", "x")
    assert code == 6, out


def test_auth_exit_codes(served) -> None:  # type: ignore[no-untyped-def]
    _ctl, fleet, url, tokens = served
    code, out = run(url, None, "isolate", "--all", "--reason", "x")
    assert code == 3 and "DRAWBRIDGE_TOKEN" in out
    code, out = run(url, tokens["viewer"], "isolate", "--all", "--reason", "x")
    assert code == 3 and "needs the operator role; viewer-user has the viewer role" in out
    code, out = run(url, tokens["operator"], "isolate", "gw0", "nope", "--reason", "x")
    assert code == 2 and "nope" in out
    code, out = run(url, tokens["operator"], "isolate", "--reason", "x")
    assert code == 2 and "say which gateways" in out
    code, out = run("http://127.0.0.1:9", tokens["operator"], "status")
    assert code == 4 and "cannot reach the controller" in out
    assert all(not a.calls for a in fleet.agents.values())


def test_gateway_add_list_remove(served, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _ctl, _fleet, url, tokens = served
    key = write_key(tmp_path)
    code, out = run(url, tokens["admin"], "gateway", "add", "gw9", "--address",
                    "10.99.0.109:2222", "--user", "root", "--key", str(key), "--host-key",
                    KEY_A, "--group", "ams", "--reason", "new site")
    assert code == 0, out
    code, out = run(url, tokens["admin"], "gateway", "add", "gw8", "--address", "10.99.0.108",
                    "--key", str(key), "--reason", "new")
    assert code == 2 and "--host-key" in out
    # the key is the controller's: a path relative to this shell's directory means nothing
    code, out = run(url, tokens["admin"], "gateway", "add", "gw8", "--address", "10.99.0.108",
                    "--key", "keys/id_ed25519", "--host-key", KEY_A, "--reason", "new")
    assert code == 2 and "absolute path on the controller's host" in out, out
    code, out = run(url, tokens["admin"], "gateway", "add", "gw8", "--address", "10.99.0.108",
                    "--key", str(key), "--host-key", KEY_A)
    assert code == 2 and "--reason" in out  # every change says why, as everywhere else
    code, out = run(url, tokens["viewer"], "gateway", "list", "--json")
    assert {"gw9": "10.99.0.109:2222"}.items() <= {g["name"]: g["address"]
                                                   for g in json.loads(out)}.items()
    code, out = run(url, tokens["operator"], "gateway", "update", "gw9", "--host-key", KEY_B,
                    "--reason", "reinstalled")
    assert code == 3 and "changing a gateway needs the admin role" in out, out
    code, out = run(url, tokens["admin"], "gateway", "update", "gw9", "--host-key", KEY_B,
                    "--address", "10.99.0.109:2200", "--reason", "reinstalled", "--json")
    assert code == 0, out
    assert (json.loads(out)["host_key"], json.loads(out)["address"]) == (KEY_B,
                                                                         "10.99.0.109:2200")
    code, out = run(url, tokens["admin"], "gateway", "update", "gw9", "--host-key", KEY_B,
                    "--trust-on-first-use", "--reason", "x")
    assert code == 2 and "not both" in out
    code, out = run(url, tokens["admin"], "gateway", "remove", "gw9", "--reason", "typo")
    assert code == 0
    assert "gw9" not in run(url, tokens["viewer"], "gateway", "list")[1]


def test_audit_verify_names_the_tampered_record(served) -> None:  # type: ignore[no-untyped-def]
    ctl, _fleet, url, tokens = served
    run(url, tokens["operator"], "isolate", "--all", "--reason", "x")
    code, out = run(url, tokens["viewer"], "audit", "verify")
    assert code == 0 and "intact" in out, out
    raw_sql(ctl.config.db_url, "UPDATE audit_log SET reason = 'nothing to see' WHERE seq = 5")
    code, out = run(url, tokens["viewer"], "audit", "verify")
    assert code == 1 and "#5" in out and "altered" in out


def test_plan_from_file(served, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _ctl, fleet, url, tokens = served
    run(url, tokens["operator"], "isolate", "--all", "--reason", "x")
    plan = tmp_path / "plan.toml"
    plan.write_text('[[stages]]\nname = "case files"\nprofile = "casefiles"\n\n'
                    '[[stages]]\nname = "all"\nrestore = true\n')
    code, out = run(url, tokens["admin"], "restore", "--all", "--plan", str(plan),
                    "--reason", "step by step")
    assert code == 0, out
    assert "stage all: done" in out and ": done" in out
    assert all(a.state == "open" for a in fleet.agents.values())
    plan.write_text('[[stages]]\nname = "x"\n')
    code, out = run(url, tokens["admin"], "restore", "--all", "--plan", str(plan),
                    "--reason", "r")
    assert code == 2 and "either" in out
