"""Controller config, time parsing, and the `drawbridge-controller` host commands."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.config import parse_listen
from controller.config import ControllerConfig, load_config
from controller.db import LATEST_VERSION
from controller.errors import ConfigError, InputError
from controller.server_cli import app
from controller.service import Controller
from controller.timeparse import parse_when
from tests.storage import raw_sql

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "controller.toml"


def test_defaults_and_example() -> None:
    cfg = ControllerConfig()
    assert (cfg.api.host, cfg.api.port) == ("127.0.0.1", 8630)
    assert cfg.db_url == "sqlite:////var/lib/drawbridge-controller/controller.db"
    example = load_config(EXAMPLE)
    assert example.api.listen == "127.0.0.1:8630" and example.fleet.parallelism == 64


@pytest.mark.parametrize("text,message", [
    ("[api]\nlisten = 'localhost:80'", "not an IP address"),
    ("[api]\nlisten = '127.0.0.1'", "HOST:PORT"),
    ("[fleet]\nparallelism = 0", "parallelism"),
    ("typo = 1", "typo"),
    ("[ssh\n", "not valid TOML"),
])
def test_bad_configs(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_parse_listen() -> None:
    assert parse_listen("[::1]:8630") == ("::1", 8630)
    with pytest.raises(ValueError):
        parse_listen("127.0.0.1:99999")


def test_parse_when() -> None:
    now = 1_000_000.0
    assert parse_when("2h", now) == now - 7200
    assert parse_when("90m", now) == now - 5400
    assert parse_when("1753228800", now) == 1753228800.0
    assert parse_when("2025-07-23", now) == dt.datetime(2025, 7, 23, tzinfo=dt.UTC).timestamp()
    assert parse_when("2025-07-23T10:00:00Z", now) == \
        dt.datetime(2025, 7, 23, 10, tzinfo=dt.UTC).timestamp()
    with pytest.raises(InputError):
        parse_when("last tuesday", now)


def test_host_commands(tmp_path: Path, db_url: str) -> None:
    cfg = tmp_path / "controller.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\ndatabase_url = "{db_url}"\n')
    runner = CliRunner()
    result = runner.invoke(app, ["-c", str(cfg), "migrate"])
    assert result.exit_code == 0 and f"schema version {LATEST_VERSION}" in result.output
    result = runner.invoke(app, ["-c", str(cfg), "token", "create", "--user", "lead",
                                 "--role", "admin"])
    assert result.exit_code == 0 and result.output.startswith("dbt_")
    token_id = result.output.split("_")[1]
    result = runner.invoke(app, ["-c", str(cfg), "token", "create", "--user", "x y",
                                 "--role", "admin"])
    assert result.exit_code == 2 and "not a valid user name" in result.output
    result = runner.invoke(app, ["-c", str(cfg), "token", "create", "--user", "x",
                                 "--role", "root"])
    assert result.exit_code == 2 and "not a role" in result.output
    assert token_id in runner.invoke(app, ["-c", str(cfg), "token", "list"]).output
    assert runner.invoke(app, ["-c", str(cfg), "token", "revoke", token_id,
                                 "--reason", "left the team"]).exit_code == 0
    result = runner.invoke(app, ["-c", str(cfg), "audit", "verify"])
    assert result.exit_code == 0 and "2 records" in result.output  # create, revoke
    assert (tmp_path / "state" / "audit.key").stat().st_mode & 0o777 == 0o600


def test_bad_config_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["-c", str(tmp_path / "missing.toml"), "migrate"])
    assert result.exit_code == 2 and "cannot read config" in result.output


def test_host_audit_commands_checkpoints_and_the_alarm(tmp_path: Path, db_url: str) -> None:
    cfg = tmp_path / "controller.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\ndatabase_url = "{db_url}"\n')
    runner = CliRunner()

    def host(*args: str) -> tuple[int, str]:
        result = runner.invoke(app, ["-c", str(cfg), *args])
        return result.exit_code, result.output

    for user in ("a", "b", "c"):
        assert host("token", "create", "--user", user, "--role", "viewer")[0] == 0
    ctl = Controller(load_config(cfg)).open()
    try:
        made = ctl.checkpoints.make("test")
        assert made is not None and made.checkpoint.seq == 3
    finally:
        ctl.close()
    exported = tmp_path / "cp.json"
    code, out = host("audit", "checkpoint", "export", "-o", str(exported), "--json")
    assert code == 0 and json.loads(out) == {"output": str(exported), "checkpoints": 1}
    code, out = host("audit", "verify", "--checkpoint", str(exported), "--json")
    assert code == 0 and json.loads(out)["checkpoints"][-1]["source"] == str(exported)
    assert host("token", "create", "--user", "d", "--role", "viewer")[0] == 0  # record 4
    raw_sql(db_url, "DELETE FROM audit_log WHERE seq = 4")  # cut the tail
    code, out = host("audit", "verify")
    assert code == 1 and "#4 is missing" in out
    code, out = host("token", "create", "--user", "e", "--role", "viewer")
    assert code == 2 and "tamper alarm" in out
    code, out = host("audit", "acknowledge", "--reason", "restored from backup", "--json")
    assert code == 0 and json.loads(out)["action"] == "audit.acknowledged"
    code, out = host("audit", "verify", "--checkpoint", str(exported))
    assert code == 0, out  # the checkpoint (#3) still holds: nothing before it was cut
    assert host("audit", "acknowledge", "--reason", "again")[0] == 1
