"""The HTTP API: auth (401/403, audited), limits (413), validation (422), streaming, OpenAPI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from controller.api import create_app
from controller.audit import HistoryQuery
from controller.auth import Role
from controller.service import Controller
from tests.unit.test_controller_support import FakeFleet, make_controller, write_key


@pytest.fixture
def setup(tmp_path: Path,
          db_url: str) -> Iterator[tuple[Controller, FakeFleet, TestClient, dict[str, str]]]:
    fleet = FakeFleet(["gw0", "gw1", "gw2"])
    ctl = make_controller(tmp_path, fleet, db_url=db_url)
    tokens = {role.name: ctl.create_token(user=f"{role.name}-user", role=role,
                                          created_by="test", reason="test")
              for role in Role}
    with TestClient(create_app(ctl)) as client:
        yield ctl, fleet, client, tokens
    ctl.close()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


ISOLATE = {"targets": {"all": True}, "reason": "incident", "ticket": "INC-1"}


def test_no_token_is_401_and_audited(setup) -> None:  # type: ignore[no-untyped-def]
    ctl, fleet, client, _tokens = setup
    resp = client.post("/v1/isolate", json=ISOLATE)
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "unauthorized"
    assert "DRAWBRIDGE_TOKEN" in resp.json()["error"]["message"]
    resp = client.get("/v1/gateways", headers=auth("dbt_000000000000_" + "x" * 43))
    assert resp.status_code == 401
    refused = ctl.history(HistoryQuery(action="auth.refused"))
    # one source, one window: the first refusal at once, the second counted
    assert [(r.actor, r.detail["request"], r.detail["source"]) for r in refused] == [
        ("anonymous", "POST /v1/isolate", "testclient")]
    ctl.refusals.flush(everything=True)
    [summary] = ctl.history(HistoryQuery(action="refusal.summary"))
    assert summary.detail["count"] == 1
    assert summary.detail["requests"] == {"GET /v1/gateways": 1}
    assert all(not a.calls for a in fleet.agents.values())


def test_viewer_isolating_is_403_and_audited(setup) -> None:  # type: ignore[no-untyped-def]
    ctl, fleet, client, tokens = setup
    resp = client.post("/v1/isolate", json=ISOLATE, headers=auth(tokens["viewer"]))
    assert resp.status_code == 403
    assert resp.json()["error"]["message"] == (
        "isolating gateways needs the operator role; viewer-user has the viewer role")
    resp = client.post("/v1/restore", json=ISOLATE, headers=auth(tokens["operator"]))
    assert resp.status_code == 403  # restore is admin
    refused = ctl.history(HistoryQuery(action="auth.refused"))
    assert [(r.actor, r.outcome) for r in refused] == [("viewer-user", "refused"),
                                                       ("operator-user", "refused")]
    assert all(a.state == "open" and not a.calls for a in fleet.agents.values())
    assert client.get("/v1/status", headers=auth(tokens["viewer"])).status_code == 200


def test_operator_isolates_admin_restores(setup) -> None:  # type: ignore[no-untyped-def]
    _ctl, fleet, client, tokens = setup
    resp = client.post("/v1/isolate", json=ISOLATE, headers=auth(tokens["operator"]))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["ok"] and body["counts"] == {"verified": 3} and body["actor"] == "operator-user"
    assert fleet.agents["gw0"].state == "isolated"
    resp = client.post("/v1/restore", json={"targets": {"gateways": ["gw0"]}, "reason": "ok"},
                       headers=auth(tokens["admin"]))
    assert resp.status_code == 200 and resp.json()["results"][0]["state"] == "open"


def test_streaming_events(setup) -> None:  # type: ignore[no-untyped-def]
    _ctl, _fleet, client, tokens = setup
    with client.stream("POST", "/v1/isolate", json=ISOLATE,
                       headers={**auth(tokens["operator"]),
                                "Accept": "application/x-ndjson"}) as resp:
        assert resp.headers["content-type"].startswith("application/x-ndjson")
        events = [json.loads(line) for line in resp.iter_lines() if line]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "accepted" and kinds[-1] == "done" and kinds.count("result") == 3
    assert events[0]["total"] == 3
    assert events[-1]["result"]["ok"] is True


@pytest.mark.parametrize("body,fragment", [
    ({"targets": {"all": True}}, "reason"),
    ({"targets": {"all": True}, "reason": "   "}, "a reason is required"),
    ({"targets": {"all": True}, "reason": "a\nb"}, "control or bidi"),
    ({"targets": {"all": True}, "reason": "x" * 501}, "500"),
    ({"targets": {"all": True}, "reason": "r", "ticket": "bad ticket!"}, "ticket"),
    ({"targets": {}, "reason": "r"}, "say which gateways"),
    ({"targets": {"all": True}, "reason": "r", "profile": "a b"}, "not a valid name"),
    ({"targets": {"all": True}, "reason": "r", "extra": 1}, "extra"),
])
def test_invalid_bodies_are_422_with_a_clear_message_and_change_nothing(
        setup, body: dict[str, object], fragment: str) -> None:  # type: ignore[no-untyped-def]
    ctl, fleet, client, tokens = setup
    resp = client.post("/v1/isolate", json=body, headers=auth(tokens["operator"]))
    assert resp.status_code == 422
    error = resp.json()["error"]
    assert error["code"] == "bad_request" and fragment in error["message"], error
    assert all(not a.calls for a in fleet.agents.values())
    assert ctl.history(HistoryQuery(action="request.refused"))[-1].actor == "operator-user"


def test_a_profile_the_gateways_lack_is_422_and_nothing_is_sent(  # type: ignore[no-untyped-def]
        setup) -> None:
    ctl, fleet, client, tokens = setup
    ctl.poll_once()  # the controller learns each gateway's profiles from its status
    resp = client.post("/v1/isolate", json={"targets": {"all": True}, "reason": "r",
                                            "profile": "interent"},
                       headers=auth(tokens["operator"]))
    assert resp.status_code == 422
    assert "unknown profile 'interent'" in resp.json()["error"]["message"]
    assert all(op != "isolate" for a in fleet.agents.values() for op, _ in a.calls)


def test_malformed_json_is_422(setup) -> None:  # type: ignore[no-untyped-def]
    _ctl, fleet, client, tokens = setup
    resp = client.post("/v1/isolate", content=b'{"targets": {"all": tru',
                       headers={**auth(tokens["operator"]), "Content-Type": "application/json"})
    assert resp.status_code == 422
    message = resp.json()["error"]["message"]
    assert message.startswith("invalid request: the body is not valid JSON at character "), message
    assert "decode error" not in message
    assert all(not a.calls for a in fleet.agents.values())


def test_oversize_bodies_are_413(setup) -> None:  # type: ignore[no-untyped-def]
    ctl, fleet, client, tokens = setup
    big = {**ISOLATE, "reason": "x" * 70_000}
    resp = client.post("/v1/isolate", json=big, headers=auth(tokens["operator"]))
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while read
        yield b'{"reason": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'

    resp = client.post("/v1/isolate", content=chunks(),
                       headers={**auth(tokens["operator"]), "Content-Type": "application/json"})
    assert resp.status_code == 413
    assert all(not a.calls for a in fleet.agents.values())
    assert refusals(ctl, "request.refused") == 2


def refusals(ctl: Controller, action: str) -> int:
    """How many refusals of `action` the log accounts for: records of their own, and the
    counts of the summaries of windows (flushed now)."""
    ctl.refusals.flush(everything=True)
    first = ctl.history(HistoryQuery(action=action))
    more = [r for r in ctl.history(HistoryQuery(action="refusal.summary"))
            if r.detail["first_action"] == action]
    return len(first) + sum(int(r.detail["count"]) for r in more)


def test_unknown_gateway_is_404_and_nothing_is_sent(setup) -> None:  # type: ignore[no-untyped-def]
    _ctl, fleet, client, tokens = setup
    resp = client.post("/v1/isolate", json={"targets": {"gateways": ["gw0", "gw9"]},
                                            "reason": "r"}, headers=auth(tokens["operator"]))
    assert resp.status_code == 404 and "gw9" in resp.json()["error"]["message"]
    assert all(not a.calls for a in fleet.agents.values())


def test_inventory_and_tokens_need_admin(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _ctl, _fleet, client, tokens = setup
    body = {"name": "gw9", "address": "10.99.0.109", "key_path": str(write_key(tmp_path)),
            "host_key": "SHA256:" + "Z" * 43, "reason": "new site"}
    assert client.post("/v1/gateways", json=body,
                       headers=auth(tokens["operator"])).status_code == 403
    resp = client.post("/v1/gateways", json=body, headers=auth(tokens["admin"]))
    assert resp.status_code == 201 and resp.json()["address"] == "10.99.0.109"
    assert client.post("/v1/gateways", json=body,
                       headers=auth(tokens["admin"])).status_code == 409
    bad_key = {**body, "name": "gw8", "address": "10.99.0.108", "key_path": "/nonexistent"}
    resp = client.post("/v1/gateways", json=bad_key, headers=auth(tokens["admin"]))
    assert resp.status_code == 422 and "does not exist" in resp.json()["error"]["message"]
    resp = client.request("DELETE", "/v1/gateways/gw9", json={"reason": "decommissioned"},
                          headers=auth(tokens["admin"]))
    assert resp.status_code == 200
    resp = client.post("/v1/tokens", json={"user": "carol", "role": "operator",
                                           "reason": "on call"}, headers=auth(tokens["admin"]))
    assert resp.status_code == 201
    assert client.get("/v1/whoami", headers=auth(resp.json()["token"])).json() == {
        "user": "carol", "role": "operator"}


def test_history_audit_openapi_metrics_health(setup) -> None:  # type: ignore[no-untyped-def]
    _ctl, _fleet, client, tokens = setup
    client.post("/v1/isolate", json=ISOLATE, headers=auth(tokens["operator"]))
    h = client.get("/v1/history", params={"action": "isolate", "since": "1h"},
                   headers=auth(tokens["viewer"]))
    assert [r["outcome"] for r in h.json()["records"]] == ["requested", "ok"]
    assert client.get("/v1/history", params={"since": "yesterday-ish"},
                      headers=auth(tokens["viewer"])).status_code == 422
    assert client.get("/v1/audit/verify", headers=auth(tokens["viewer"])).json()["ok"]
    schema = client.get("/openapi.json").json()
    assert {"/v1/isolate", "/v1/restore", "/v1/history", "/v1/audit/verify",
            "/v1/gateways"} <= set(schema["paths"])
    assert "IsolateBody" in schema["components"]["schemas"]
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "drawbridge_controller_gateways" in metrics.text
    assert client.get("/v1/health").json()["status"] == "ok"
