"""Restore plans: bring gateways back step by step, with proof at every step.

A plan is a TOML file of ordered stages. Each stage either moves its gateways
to a less strict profile (one the agents know, e.g. a profile that opens the
case-file service) or restores them fully. A stage starts only when the stage
before it is done: every gateway applied and verified, and every probe the stage
names passed on each of them. A stage may have to be approved first, by a
second admin. The first failure stops the plan, and says where.

Plans are stored and driven by the controller (controller/plan_service.py,
plan_machine.py, plan_driver.py); this module is the file.

    name = "reconnect after the NetScaler incident"

    [[stages]]
    name = "case files"
    profile = "casefiles"          # isolate with this (less strict) profile

    [[stages]]
    name = "offices first"
    groups = ["offices"]           # optional: only these of the command's targets
    restore = true

    [[stages]]
    name = "everything else"
    restore = true
    pause = "30s"                  # optional: wait before this stage starts
    gate = "approval"              # "auto" (default) or "approval": a second admin
                                   # approves before the stage applies
    probes = ["outside-web"]       # optional: must pass on each of its gateways
    probe_timeout = "5m"           # optional: how long they may take to pass

A stage may repeat the previous stage's profile on (some of) its gateways: it then
changes nothing and is a pure checkpoint (its gate, its probes).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.config import Name
from agent.requests import parse_duration
from controller.errors import InputError


class Stage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=100)
    profile: Name | None = None
    restore: bool = False
    gateways: tuple[Name, ...] = ()
    groups: tuple[Name, ...] = ()
    pause_seconds: int = Field(default=0, ge=0, le=7 * 24 * 3600)
    gate: Literal["auto", "approval"] = "auto"
    probes: tuple[Name, ...] = Field(default=(), max_length=32)
    probe_timeout_seconds: int | None = Field(default=None, gt=0, le=7 * 24 * 3600)

    @model_validator(mode="before")
    @classmethod
    def _durations(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for key, field in (("pause", "pause_seconds"), ("probe_timeout", "probe_timeout_seconds")):
            if key in data:
                value = data.pop(key)
                try:
                    data[field] = parse_duration(str(value))
                except ValueError as exc:
                    raise ValueError(f"{key}: {exc}") from None
        return data

    @model_validator(mode="after")
    def _one_action(self) -> Stage:
        if (self.profile is None) == (not self.restore):
            raise ValueError(f"stage {self.name!r}: give either 'profile = \"...\"' or "
                             "'restore = true'")
        return self

    @property
    def action(self) -> str:
        return "restore" if self.restore else "isolate"

    def selects(self, name: str, groups: tuple[str, ...]) -> bool:
        if not self.gateways and not self.groups:
            return True
        return name in self.gateways or any(g in self.groups for g in groups)


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="restore plan", max_length=200)
    stages: tuple[Stage, ...] = Field(min_length=1, max_length=50)

    @field_validator("stages")
    @classmethod
    def _unique(cls, stages: tuple[Stage, ...]) -> tuple[Stage, ...]:
        names = [s.name for s in stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage names must be unique: {', '.join(dupes)}")
        return stages

    def window(self, start: str | None = None, through: str | None = None) -> list[Stage]:
        """The stages from `start` through `through` (names), in order."""
        names = [s.name for s in self.stages]
        for label, value in (("--from", start), ("--through", through)):
            if value is not None and value not in names:
                raise InputError(f"{label}: no stage called {value!r} (stages: "
                                 f"{', '.join(names)})")
        lo = names.index(start) if start else 0
        hi = names.index(through) if through else len(names) - 1
        if hi < lo:
            raise InputError(f"stage {through!r} comes before {start!r}")
        return list(self.stages[lo:hi + 1])


def parse_plan(data: Any, source: str = "<plan>") -> Plan:
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: invalid restore plan"]
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {where}: {err['msg'].removeprefix('Value error, ')}")
        raise InputError("\n".join(lines)) from None


def load_plan(path: Path) -> Plan:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read plan {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid TOML: {exc}") from None
    return parse_plan(data, str(path))
