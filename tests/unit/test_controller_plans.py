"""Restore plans: parsing, validation, stage windows."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.errors import InputError
from controller.plans import load_plan, parse_plan

PLAN = """
name = "reconnect"

[[stages]]
name = "case files"
profile = "casefiles"

[[stages]]
name = "offices"
groups = ["offices"]
restore = true
pause = "2m"

[[stages]]
name = "everything"
restore = true
"""


def test_load_plan(tmp_path: Path) -> None:
    path = tmp_path / "plan.toml"
    path.write_text(PLAN)
    plan = load_plan(path)
    assert [s.name for s in plan.stages] == ["case files", "offices", "everything"]
    assert [s.action for s in plan.stages] == ["isolate", "restore", "restore"]
    assert plan.stages[1].pause_seconds == 120
    assert plan.stages[1].selects("gwx", ("offices",))
    assert not plan.stages[1].selects("gwx", ("dc",))
    assert plan.stages[0].selects("anything", ())
    assert parse_plan(plan.model_dump(mode="json")) == plan  # what the CLI sends the API


def test_window() -> None:
    plan = parse_plan({"stages": [{"name": n, "restore": True} for n in "abcd"]})
    assert [s.name for s in plan.window()] == list("abcd")
    assert [s.name for s in plan.window("b", "c")] == ["b", "c"]
    with pytest.raises(InputError, match="no stage called 'x'"):
        plan.window("x")
    with pytest.raises(InputError, match="comes before"):
        plan.window("c", "b")


@pytest.mark.parametrize("data,message", [
    ({"stages": []}, "at least 1"),
    ({"stages": [{"name": "a"}]}, "either"),
    ({"stages": [{"name": "a", "profile": "p", "restore": True}]}, "either"),
    ({"stages": [{"name": "a", "restore": True}, {"name": "a", "restore": True}]}, "unique"),
    ({"stages": [{"name": "a", "restore": True, "pause": "soon"}]}, "duration"),
    ({"stages": [{"name": "a", "profile": "bad name!"}]}, "not a valid name"),
    ({"stages": [{"name": "a", "restore": True, "typo": 1}]}, "typo"),
])
def test_invalid_plans(data: dict[str, object], message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_plan(data)


def test_unreadable_plan(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read"):
        load_plan(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("stages = [")
    with pytest.raises(InputError, match="not valid TOML"):
        load_plan(bad)
