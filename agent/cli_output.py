"""How `drawbridge-agent` shows what the agent answered (human tables; --json is raw)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import typer
from rich.table import Table

from agent.cli_support import EXIT_UNVERIFIED, out


def when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def print_change(result: dict[str, Any], as_json: bool) -> None:
    verification = result["verification"]
    if as_json:
        out.print_json(data=result)
    else:
        profile = f" (profile {result['profile']})" if result.get("profile") else ""
        out.print(f"{result['gateway']}: {result['state']}{profile}; "
                  f"applied in {result['apply_seconds'] * 1000:.0f} ms; "
                  f"read-back {'matches' if result['in_sync'] else 'DIFFERS'}; "
                  f"{verification['status']}", highlight=False)
        for problem in result.get("problems", []):
            out.print(f"  ! {problem}", highlight=False)
        for line in verification.get("detail", []) or [
                f"failing: {name}" for name in verification.get("failing", [])]:
            out.print(f"  ! {line}", highlight=False)
        if result.get("note"):
            out.print(f"  note: {result['note']}", highlight=False)
        if result.get("provisional"):
            out.print(f"  provisional: confirm by {when(result['provisional']['deadline'])} "
                      "(drawbridge-agent confirm) or it is rolled back", highlight=False)
    if not result["in_sync"] or verification["status"] == "unverified":
        raise typer.Exit(EXIT_UNVERIFIED)


def flow_text(flow: dict[str, Any]) -> str:
    ports = ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in flow["ports"]) or "echo"
    return f"{flow['cidr']} {flow['proto']}/{ports}"


def print_status(s: dict[str, Any]) -> None:
    v = s["verification"]
    table = Table(show_header=False, box=None)
    table.add_row("gateway", s["gateway"])
    table.add_row("state", s["state"] + (f" (profile {s['profile']})" if s["profile"] else ""))
    table.add_row("since", f"{when(s['since'])} by {s['actor']}: {s['reason']}")
    table.add_row("kernel", "matches desired state" if s["in_sync"] else "DIFFERS")
    for problem in s["problems"]:
        table.add_row("", f"! {problem}")
    table.add_row("verification", v["status"] + (f" at {when(v['checked_at'])}"
                                                  if v.get("checked_at") else ""))
    for line in v.get("detail", []) or [f"failing: {n}" for n in v.get("failing", [])]:
        table.add_row("", f"! {line}")
    for line in s.get("bypass", []):
        table.add_row("", f"! bypass: {line}")
    if s.get("provisional"):
        p = s["provisional"]
        table.add_row("provisional", f"{p['action']} must be confirmed by "
                      f"{when(p['deadline'])} (drawbridge-agent confirm), else it is rolled back")
    if s.get("unconfirmed"):
        table.add_row("", f"! {s['unconfirmed']}")
    for line in s.get("unresolved", []):
        table.add_row("", f"! {line}")
    for exc in s["exceptions"]:
        flow = exc["flow"]
        table.add_row("exception", f"{exc['id']} {flow_text(flow)} {flow['direction']} "
                      f"until {when(exc['expires_at'])} ({exc['actor']}: {exc['reason']})")
    table.add_row("agent", f"{s.get('agent_version', '?')}, config {s.get('config_digest') or '?'}")
    out.print(table)


