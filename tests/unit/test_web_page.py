"""The /ui page through the real app (TestClient): login, cookie, CSRF, escaping, the
report and annotation endpoints."""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from controller.api import create_app
from controller.audit import AuditEvent, HistoryQuery
from controller.auth import Role
from controller.service import Controller
from tests.unit.test_controller_support import FakeFleet, make_controller

HOSTILE = ("<script>alert(1)</script>", '"><svg onload=alert(2)>', "all clear \u202eevil")


@pytest.fixture
def setup(tmp_path: Path,
          db_url: str) -> Iterator[tuple[Controller, FakeFleet, dict[str, str]]]:
    fleet = FakeFleet(["gw0", "gw1"])
    ctl = make_controller(tmp_path, fleet, db_url=db_url)
    tokens = {role.name: ctl.create_token(user=f"{role.name}-user", role=role,
                                          created_by="test", reason="test") for role in Role}
    yield ctl, fleet, tokens
    ctl.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]{64})"', html)
    assert match, html
    return match.group(1)


def login(client: TestClient, token: str) -> None:
    form = client.get("/ui/login")
    resp = client.post("/ui/login", data={"token": token, "csrf": csrf_of(form.text)},
                       follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"] == "/ui/", resp.text


def drill(client: TestClient, tokens: dict[str, str], ctl: Controller) -> None:
    op = bearer(tokens["operator"])
    assert client.post("/v1/isolate", json={"targets": {"all": True}, "reason": HOSTILE[0],
                                            "ticket": "INC-1"}, headers=op).status_code == 200
    assert client.post("/v1/allow", json={
        "targets": {"gateways": ["gw0"]}, "reason": HOSTILE[1], "cidr": "203.0.113.0/24",
        "proto": "tcp", "ports": [443], "duration_seconds": 3600}, headers=op).status_code == 200
    # bidi overrides are refused at the door; a record from before that rule (written
    # directly here) must still be shown harmlessly
    refused = client.post("/v1/restore", json={"targets": {"all": True}, "reason": HOSTILE[2]},
                          headers=bearer(tokens["admin"]))
    assert refused.status_code == 422 and "bidi" in refused.text
    assert client.post("/v1/restore", json={"targets": {"all": True}, "reason": "all clear"},
                       headers=bearer(tokens["admin"])).status_code == 200
    ctl.record(AuditEvent(actor="admin-user", action="restore", outcome="ok", reason=HOSTILE[2],
                          targets=("gw1",)))
    ctl.checkpoints.wait()  # the one after the restore (made on its own thread)


class Forms(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, str | None]] = []
        self.buttons = 0
        self.scripts = 0
        self.handlers: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "form":
            self.forms.append(a)
        self.buttons += tag == "button"
        self.scripts += tag == "script"
        self.handlers += [k for k in a if k.startswith("on")]


def test_no_cookie_redirects_to_login_and_shows_no_data(setup) -> None:  # type: ignore[no-untyped-def]
    ctl, _fleet, _tokens = setup
    with TestClient(create_app(ctl)) as client:
        for path in ("/ui/", "/ui/audit/1", "/ui/report?format=json"):
            resp = client.get(path, follow_redirects=False)
            assert resp.status_code == 303 and resp.headers["location"] == "/ui/login", path
        page = client.get("/ui/login")
        assert page.status_code == 200 and 'type="password"' in page.text
        assert "gw0" not in page.text
        assert "HttpOnly" in page.headers["set-cookie"]  # the login nonce


def test_bad_token_cookie_is_401_login_and_audited(setup) -> None:  # type: ignore[no-untyped-def]
    ctl, _fleet, _tokens = setup
    with TestClient(create_app(ctl)) as client:
        client.cookies.set("drawbridge_session", "dbt_000000000000_" + "x" * 43, path="/ui")
        resp = client.get("/ui/", follow_redirects=False)
        assert resp.status_code == 401 and 'type="password"' in resp.text
        assert "gw0" not in resp.text and "not valid" in resp.text
    refused = ctl.history(HistoryQuery(action="auth.refused"))
    assert refused[-1].detail["request"] == "GET /ui/"


def test_login_sets_a_strict_httponly_cookie_and_logout_clears_it(setup) -> None:  # type: ignore[no-untyped-def]
    ctl, _fleet, tokens = setup
    with TestClient(create_app(ctl)) as client:
        form = client.get("/ui/login")
        resp = client.post("/ui/login", data={"token": tokens["viewer"],
                                              "csrf": csrf_of(form.text)},
                           follow_redirects=False)
        cookie = next(c for c in resp.headers.get_list("set-cookie")
                      if c.startswith("drawbridge_session="))
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
        assert "Secure" not in cookie  # plain HTTP here; see the TLS test
        page = client.get("/ui/")
        assert page.status_code == 200 and "viewer-user" in page.text
        assert page.headers["content-security-policy"].startswith("default-src 'none'")
        # the API never takes the cookie: Bearer only
        assert client.get("/v1/status").status_code == 401
        resp = client.post("/ui/logout", data={"csrf": csrf_of(page.text)},
                           follow_redirects=False)
        assert resp.status_code == 303 and resp.headers["location"] == "/ui/login"
        assert 'drawbridge_session=""' in resp.headers["set-cookie"]
        assert client.get("/ui/", follow_redirects=False).status_code == 303


def test_cookie_is_secure_over_tls(setup) -> None:  # type: ignore[no-untyped-def]
    ctl, _fleet, tokens = setup
    with TestClient(create_app(ctl), base_url="https://controller.example") as client:
        form = client.get("/ui/login")
        resp = client.post("/ui/login", data={"token": tokens["viewer"],
                                              "csrf": csrf_of(form.text)},
                           follow_redirects=False)
        assert all("Secure" in c for c in resp.headers.get_list("set-cookie"))


def test_forms_without_the_csrf_token_are_refused(setup) -> None:  # type: ignore[no-untyped-def]
    ctl, _fleet, tokens = setup
    with TestClient(create_app(ctl)) as client:
        client.get("/ui/login")  # has the nonce cookie, but posts no token
        resp = client.post("/ui/login", data={"token": tokens["viewer"]},
                           follow_redirects=False)
        assert resp.status_code == 403 and "drawbridge_session=dbt" not in \
            resp.headers.get("set-cookie", "")
        resp = client.post("/ui/login", data={"token": tokens["viewer"], "csrf": "0" * 64},
                           follow_redirects=False)
        assert resp.status_code == 403
        login(client, tokens["viewer"])
        for data in ({}, {"csrf": "0" * 64}):
            resp = client.post("/ui/logout", data=data, follow_redirects=False)
            assert resp.status_code == 403, data
            assert "drawbridge_session" not in resp.headers.get("set-cookie", "")
        assert client.get("/ui/", follow_redirects=False).status_code == 200  # still in
        # a token made for another session does not fit this one
        with TestClient(create_app(ctl)) as other:
            login(other, tokens["admin"])
            foreign = csrf_of(other.get("/ui/").text)
        assert client.post("/ui/logout", data={"csrf": foreign},
                           follow_redirects=False).status_code == 403


def test_page_shows_the_fleet_timeline_and_escapes_everything(setup) -> None:  # type: ignore[no-untyped-def]
    ctl, _fleet, tokens = setup
    with TestClient(create_app(ctl)) as client:
        drill(client, tokens, ctl)
        login(client, tokens["viewer"])
        html = client.get("/ui/", params={"since": "1h"}).text
    rows = re.findall(r'<tr class="gateway" data-gateway="(gw\d)">', html)
    assert rows == ["gw0", "gw1"]
    assert 'class="state state-open">open<' in html and ">verified<" in html
    svg = html[html.index("<svg"):html.index("</svg>")]
    links = re.findall(r'<a href="/ui/audit/(\d+)" class="mark mark-(\w+)"', svg)
    kinds = {k for _, k in links}
    assert {"isolate", "allow", "restore", "exception"} <= kinds
    parsed = Forms()
    parsed.feed(html)
    assert parsed.scripts == 0 and parsed.handlers == []
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&#34;&gt;&lt;svg onload=alert(2)&gt;" in html
    assert "\u202e" not in html and "[U+202E]" in html
    assert html.count("<svg") == 1
    cp = ctl.checkpoints.store.last()
    assert cp is not None and f"#{cp.checkpoint.seq} " in html  # last checkpoint
    assert "recorded on 2 of 2 gateway(s): gw0, gw1" in html
    assert "intact" in html


def test_a_viewer_sees_no_mutating_control(setup) -> None:  # type: ignore[no-untyped-def]
    ctl, _fleet, tokens = setup
    with TestClient(create_app(ctl)) as client:
        drill(client, tokens, ctl)
        login(client, tokens["viewer"])
        for path in ("/ui/", "/ui/audit/3"):
            parsed = Forms()
            parsed.feed(client.get(path).text)
            posts = [f for f in parsed.forms if (f.get("method") or "get").lower() == "post"]
            assert [f.get("action") for f in posts] == ["/ui/logout"], path
            assert parsed.buttons == 1 + (path == "/ui/")  # log out (+ the window's Show)


def test_audit_record_page(setup) -> None:  # type: ignore[no-untyped-def]
    ctl, _fleet, tokens = setup
    with TestClient(create_app(ctl)) as client:
        drill(client, tokens, ctl)
        login(client, tokens["viewer"])
        allow = ctl.history(HistoryQuery(action="allow"))[-1]
        html = client.get(f"/ui/audit/{allow.seq}").text
        assert f'<dd class="seq">{allow.seq}</dd>' in html
        for text in (allow.hash, allow.prev_hash, "operator-user", "gw0",
                     "&#34;&gt;&lt;svg onload=alert(2)&gt;"):
            assert text in html, text
        assert client.get("/ui/audit/99999").status_code == 404


def test_report_from_the_page_and_the_api(setup) -> None:  # type: ignore[no-untyped-def]
    ctl, _fleet, tokens = setup
    with TestClient(create_app(ctl)) as client:
        drill(client, tokens, ctl)
        api = client.get("/v1/report", params={"format": "json", "since": "1h"},
                         headers=bearer(tokens["viewer"]))
        assert api.status_code == 200 and "attachment" in api.headers["content-disposition"]
        seqs = [a["seq"] for a in api.json()["actions"]]
        assert seqs == list(range(seqs[0], ctl.audit.last_seq() + 1))
        pdf = client.get("/v1/report", params={"format": "pdf"},
                         headers=bearer(tokens["viewer"]))
        assert pdf.content.startswith(b"%PDF")
        assert client.get("/v1/report", params={"format": "doc"},
                          headers=bearer(tokens["viewer"])).status_code == 422
        assert client.get("/v1/report", params={"since": "soon"},
                          headers=bearer(tokens["viewer"])).status_code == 422
        assert client.get("/v1/report").status_code == 401
        login(client, tokens["viewer"])
        page = client.get("/ui/report", params={"format": "html", "since": "1h"})
        assert page.status_code == 200 and page.text.startswith("<!DOCTYPE html>")
        assert "&lt;script&gt;" in page.text


def test_annotations_for_grafana(setup) -> None:  # type: ignore[no-untyped-def]
    ctl, _fleet, tokens = setup
    with TestClient(create_app(ctl)) as client:
        drill(client, tokens, ctl)
        ctl.record(AuditEvent(actor="x", action="probe", outcome="ok"))
        now_ms = int(ctl.clock() * 1000)
        resp = client.get("/v1/annotations", params={"from": str(now_ms - 3_600_000),
                                                     "to": str(now_ms + 1000)},
                          headers=bearer(tokens["viewer"]))
        assert resp.status_code == 200
        notes = resp.json()
        assert [n["tags"][1] for n in notes] == ["isolate", "allow", "restore", "restore"]
        allow = notes[1]
        assert allow["timeEnd"] - allow["time"] == 3_600_000
        assert all(set(n) >= {"time", "title", "text", "tags"} for n in notes)
        assert HOSTILE[0] in notes[0]["text"]  # data, not markup: JSON as stored
        assert client.get("/v1/annotations").status_code == 401
        old = client.get("/v1/annotations", params={"from": "1", "to": "1000"},
                         headers=bearer(tokens["viewer"]))
        assert old.json() == []
