"""`drawbridge plan ...`: restore plans stored and driven by the controller.

    drawbridge plan start FILE --reason R [--ticket T] [GW... | --group G | --all]
    drawbridge plan status [ID] [--json]
    drawbridge plan approve|pause|resume|abort ID --reason R

`drawbridge restore --plan FILE` is `plan start` followed until the plan is done,
fails, or waits for a person. Exit codes: 0 done (or, without --follow, accepted);
1 failed or aborted; 2 bad input; 3 not allowed (e.g. approving one's own plan); 4
controller unreachable; 7 the plan waits for a person: a stage awaits approval, or
the plan is paused.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, NoReturn

import typer
from rich.table import Table

from controller.cli_common import (
    EXIT_FAILED,
    EXIT_INPUT,
    EXIT_WAITING,
    AllOpt,
    AuditReasonOpt,
    GroupOpt,
    JsonOpt,
    NamesArg,
    TicketOpt,
    call,
    err,
    fail,
    out,
    print_json,
    when,
)

plan_app = typer.Typer(help="Restore plans, stored and driven by the controller: start, "
                            "status, approve (a second admin), pause, resume, abort.",
                       no_args_is_help=True, rich_markup_mode=None)

IdArg = Annotated[str, typer.Argument(metavar="ID", help="The plan id (plan status).")]
FollowOpt = Annotated[bool, typer.Option(
    "--follow", help="Follow the plan until it is done, fails, or waits for a person.")]
FINISHED = ("done", "failed", "aborted")
STAGE_STYLE = MappingProxyType({
    "done": "green", "running": "cyan", "awaiting approval": "yellow", "paused": "yellow",
    "failed": "red", "aborted": "red", "pending": "", "skipped": "dim"})


def waits_for_person(plan: dict[str, Any]) -> bool:
    if plan["state"] == "paused":
        return True
    return plan["state"] == "running" and any(
        s["state"] == "awaiting approval" and not s["approved_by"] for s in plan["stages"])


def plan_exit(plan: dict[str, Any]) -> int:
    if plan["state"] == "done":
        return 0
    if plan["state"] in ("failed", "aborted"):
        return EXIT_FAILED
    if waits_for_person(plan):
        return EXIT_WAITING
    return 0


def show(plan: dict[str, Any]) -> None:
    title = f"plan {plan['plan_id']} {plan['name']!r}: {plan['state']}"
    table = Table("#", "stage", "state", "action", "gateways", "gate", "probes", "command",
                  "note", title=title)
    for s in plan["stages"]:
        style = STAGE_STYLE.get(s["state"], "")
        state = f"[{style}]{s['state']}[/]" if style else s["state"]
        action = "checkpoint" if s["checkpoint_only"] else (
            s["action"] + (f" {s['profile']}" if s["profile"] else ""))
        gate = s["gate"] + (f" (by {s['approved_by']})" if s["approved_by"] else "")
        table.add_row(str(s["index"] + 1), s["name"], state, action, ", ".join(s["gateways"]),
                      gate, ", ".join(s["probes"]) or "-", s["command_id"] or "-", s["note"])
    out.print(table)
    out.print(f"started {when(plan['created_at'])} by {plan['actor']}: {plan['reason']}"
              + (f" [{plan['ticket']}]" if plan["ticket"] else ""), highlight=False)
    if plan["note"]:
        out.print(f"note: {plan['note']}", highlight=False)
    if plan["state"] not in FINISHED and plan.get("waiting"):
        out.print(f"waiting: {plan['waiting']}", highlight=False)
    if waits_for_person(plan) and plan["state"] == "running":
        out.print(f"approve with: drawbridge plan approve {plan['plan_id']} --reason ... "
                  "(an admin other than the one who started it)", highlight=False)


def follow(plan: dict[str, Any], as_json: bool, *, interval: float = 1.0) -> NoReturn:
    """Poll the plan until it is finished or waits for a person; report stage changes."""
    seen: dict[str, str] = {}
    while True:
        if not as_json:
            for s in plan["stages"]:
                if seen.get(s["name"]) != s["state"]:
                    seen[s["name"]] = s["state"]
                    err.print(f"stage {s['name']}: {s['state']}"
                              + (f" ({s['note']})" if s["note"] else ""), highlight=False)
        if plan["state"] in FINISHED or waits_for_person(plan):
            break
        time.sleep(interval)
        plan = call("GET", f"/v1/plans/{plan['plan_id']}")
    if as_json:
        print_json(plan)
    else:
        show(plan)
    raise typer.Exit(plan_exit(plan))


def _plan_body(path: Path, body: dict[str, Any], from_stage: str | None,
               through: str | None) -> dict[str, Any]:
    from controller.errors import ControllerError
    from controller.plans import load_plan

    try:
        plan = load_plan(path).model_dump(mode="json")
    except ControllerError as exc:
        fail(exc.message, EXIT_INPUT)
    return {**body, "plan": plan, "from_stage": from_stage, "through_stage": through}


def restore_with_plan(path: Path, body: dict[str, Any], *, from_stage: str | None,
                      through: str | None, as_json: bool) -> NoReturn:
    """`drawbridge restore --plan FILE`: start the plan, follow it."""
    plan = call("POST", "/v1/plans", _plan_body(path, body, from_stage, through))
    if not as_json:
        err.print(f"plan {plan['plan_id']} started: the controller drives it (drawbridge "
                  f"plan status {plan['plan_id']})", highlight=False)
    follow(plan, as_json)


@plan_app.command("start")
def plan_start(
    file: Annotated[Path, typer.Argument(help="The plan (TOML): stages.")],
    reason: AuditReasonOpt,
    names: NamesArg = None,
    group: GroupOpt = None,
    all_: AllOpt = False,
    from_stage: Annotated[str | None, typer.Option("--from", help="Start at this stage.")]
    = None,
    through: Annotated[str | None, typer.Option(help="Stop after this stage.")] = None,
    ticket: TicketOpt = None,
    follow_it: FollowOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Store a restore plan in the controller and start it (its gateways: the names,
    groups, or every gateway when none is given). Prints the plan id."""
    if all_ and (names or group):
        fail("--all cannot be combined with names or --group", EXIT_INPUT)
    targets = {"gateways": names or [], "groups": group or [],
               "all": all_ or not (names or group)}
    body = {"targets": targets, "reason": reason, "ticket": ticket}
    plan = call("POST", "/v1/plans", _plan_body(file, body, from_stage, through))
    if follow_it:
        follow(plan, as_json)
    if as_json:
        print_json(plan)
    else:
        out.print(f"plan {plan['plan_id']} started ({len(plan['stages'])} stage(s) over "
                  f"{len(plan['targets'])} gateway(s)); follow it with: drawbridge plan "
                  f"status {plan['plan_id']}", highlight=False)


@plan_app.command("status")
def plan_status(
    plan_id: Annotated[str | None, typer.Argument(
        metavar="[ID]", help="A plan (default: the most recent plans).")] = None,
    limit: Annotated[int, typer.Option(help="How many plans, without ID.")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """A plan's stages and their states in words (done, running, awaiting approval,
    pending, failed, aborted, paused); without ID, the most recent plans."""
    if plan_id is None:
        plans = call("GET", "/v1/plans", limit=limit)
        if as_json:
            print_json(plans)
            return
        table = Table("plan", "name", "state", "stage now", "started", "by", "reason")
        for p in plans:
            table.add_row(p["plan_id"], p["name"], p["state"], p["current_stage"] or "-",
                          when(p["created_at"]), p["actor"], p["reason"])
        out.print(table)
        return
    plan = call("GET", f"/v1/plans/{plan_id}")
    if as_json:
        print_json(plan)
    else:
        show(plan)
    raise typer.Exit(plan_exit(plan))


def _control(verb: str, plan_id: str, reason: str, follow_it: bool, as_json: bool) -> None:
    plan = call("POST", f"/v1/plans/{plan_id}/{verb}", {"reason": reason})
    if follow_it:
        follow(plan, as_json)
    if as_json:
        print_json(plan)
    else:
        show(plan)


@plan_app.command("approve")
def plan_approve(plan_id: IdArg, reason: AuditReasonOpt, follow_it: FollowOpt = False,
                 as_json: JsonOpt = False) -> None:
    """Pass the gate of the stage that awaits approval (an admin other than the one who
    started the plan: the two-person rule)."""
    _control("approve", plan_id, reason, follow_it, as_json)


@plan_app.command("pause")
def plan_pause(plan_id: IdArg, reason: AuditReasonOpt, as_json: JsonOpt = False) -> None:
    """No further step starts until `plan resume` (a step under way finishes)."""
    _control("pause", plan_id, reason, False, as_json)


@plan_app.command("resume")
def plan_resume(plan_id: IdArg, reason: AuditReasonOpt, follow_it: FollowOpt = False,
                as_json: JsonOpt = False) -> None:
    """Carry on with a paused plan; or try a failed plan's failed stage again."""
    _control("resume", plan_id, reason, follow_it, as_json)


@plan_app.command("abort")
def plan_abort(plan_id: IdArg, reason: AuditReasonOpt, follow_it: FollowOpt = False,
               as_json: JsonOpt = False) -> None:
    """Return the plan's gateways to the state they had when it started (the profile each
    had, isolated again if it was isolated); --follow waits until they are."""
    _control("abort", plan_id, reason, follow_it, as_json)
