"""The incident lead's page under /ui: server-rendered, read-only, works without JavaScript.

The API's gate lets /ui through without a Bearer header; every page here
authenticates the session cookie itself (no cookie: to the login page; a bad
or revoked token: the login page with 401, audited like any refused token).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment

from controller.audit import AuditRecord
from controller.auth import Principal
from controller.errors import ControllerError, InputError, Unauthorized
from controller.service import Controller
from controller.web import session
from controller.web.fleetview import fleet_rows
from controller.web.loading import (
    VerifyCache,
    WindowTooLarge,
    head_of,
    load_window,
    make_report,
    timeline_of,
)
from controller.web.report_formats import FORMATS, filename, to_csv, to_html, to_json
from controller.web.report_pdf import to_pdf
from controller.web.sources import CheckpointSource, PlanSource
from controller.web.svg import layout, render_svg
from controller.web.templating import iso
from controller.web.window import DEFAULT_SPAN, parse_window

# No script may run on these pages at all (they need none): an injected <script> or
# event handler that escaped escaping would still be dead. Inline CSS only.
SECURITY_HEADERS = MappingProxyType({
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                               "img-src 'self' data:; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
})


@dataclass(frozen=True)
class UiDeps:
    ctl: Controller
    env: Environment
    secret: bytes
    plans: PlanSource
    checkpoints: CheckpointSource
    verify: VerifyCache


QUICK_SPANS = (("last hour", "1h"), ("6 h", "6h"), ("24 h", DEFAULT_SPAN), ("7 days", "7d"),
               ("30 days", "30d"))


def _page(html: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(html, status_code=status, headers=dict(SECURITY_HEADERS))


def _audit_link(seq: int) -> str:
    return f"/ui/audit/{seq}"


def ui_router(deps: UiDeps) -> APIRouter:
    router = APIRouter(prefix="/ui", include_in_schema=False)
    ctl, env = deps.ctl, deps.env

    def login_page(request: Request, *, status: int = 200, error: str | None = None,
                   clear: bool = False) -> Response:
        nonce = session.new_nonce()
        html = env.get_template("login.html").render(
            csrf=session.csrf_for(deps.secret, nonce), error=error)
        response = _page(html, status)
        secure = session.is_tls(request)
        session.set_login_nonce(response, nonce, secure=secure)
        if clear:
            session.clear_session(response, secure=secure)
        return response

    def who(request: Request) -> Principal | Response:
        token = request.cookies.get(session.SESSION_COOKIE)
        if not token:
            return RedirectResponse("/ui/login", status_code=303)
        try:
            return ctl.authenticate(token, path=f"{request.method} {request.url.path}",
                                    source=request.client.host if request.client else "unknown")
        except Unauthorized as exc:
            return login_page(request, status=401, error=exc.message, clear=True)

    def render(request: Request, template: str, principal: Principal, *, status: int = 200,
               **values: object) -> Response:
        token = request.cookies.get(session.SESSION_COOKIE, "")
        html = env.get_template(template).render(
            user=principal.user, role=principal.role.name,
            csrf=session.csrf_for(deps.secret, token), **values)
        return _page(html, status)

    @router.get("")
    def root() -> Response:
        return RedirectResponse("/ui/", status_code=303)

    @router.get("/login")
    def login_form(request: Request) -> Response:
        return login_page(request)

    @router.post("/login")
    async def login(request: Request) -> Response:
        form = await request.form()
        token, given = str(form.get("token") or "").strip(), form.get("csrf")
        if not session.csrf_ok(deps.secret, request.cookies.get(session.LOGIN_COOKIE),
                               given if isinstance(given, str) else None):
            return login_page(request, status=403,
                              error="the login form expired or did not come from this page; "
                                    "try again")
        try:
            ctl.authenticate(token or None, path="POST /ui/login",
                             source=request.client.host if request.client else "unknown")
        except Unauthorized as exc:
            return login_page(request, status=401, error=exc.message)
        response = RedirectResponse("/ui/", status_code=303)
        session.set_session(response, token, secure=session.is_tls(request))
        return response

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        form = await request.form()
        given = form.get("csrf")
        if not session.csrf_ok(deps.secret, request.cookies.get(session.SESSION_COOKIE),
                               given if isinstance(given, str) else None):
            return _page(env.get_template("error.html").render(
                title="Refused", message="This form did not come from this session's page "
                "(missing or wrong CSRF token). Nothing was changed."), 403)
        response = RedirectResponse("/ui/login", status_code=303)
        session.clear_session(response, secure=session.is_tls(request))
        return response

    @router.get("/")
    def index(request: Request, since: str | None = None, until: str | None = None,
              refresh: Annotated[int, Query(ge=0, le=3600)] = 30) -> Response:
        principal = who(request)
        if not isinstance(principal, Principal):
            return principal
        now = ctl.clock()
        try:
            window = parse_window(since, until, now)
            data = load_window(ctl, window)
        except (ControllerError, WindowTooLarge) as exc:
            return render(request, "error_page.html", principal, status=400,
                          title="Bad time window", message=str(exc))
        timeline = timeline_of(data)
        svg = render_svg(env, layout(timeline), href=_audit_link)
        return render(
            request, "index.html", principal, now=now, window=window,
            since_text=since or "", until_text=until or "", refresh=refresh,
            rows=fleet_rows(ctl.views(), now), svg=svg,
            plans=deps.plans.plans(window.since, window.until), link=_audit_link,
            verify=deps.verify.get(), head=head_of(ctl), checkpoint=deps.checkpoints.last(),
            records=len(data.records), quick=QUICK_SPANS,
            report_query={"since": iso(window.since), "until": iso(window.until)},
            formats=list(FORMATS))

    @router.get("/audit/{seq}")
    def audit_record(request: Request, seq: int) -> Response:
        principal = who(request)
        if not isinstance(principal, Principal):
            return principal
        record: AuditRecord | None = ctl.audit.get(seq)
        if record is None:
            return render(request, "error_page.html", principal, status=404,
                          title="No such record", message=f"the audit log has no record #{seq}")
        return render(request, "audit.html", principal, rec=record,
                      last_seq=ctl.audit.last_seq(),
                      detail_json=json.dumps(record.detail, indent=2, sort_keys=True,
                                             ensure_ascii=False))

    @router.get("/report")
    def report(request: Request, since: str | None = None, until: str | None = None,
               format: str = "html") -> Response:
        principal = who(request)
        if not isinstance(principal, Principal):
            return principal
        try:
            body, media, name = report_response(deps, principal, since, until, format)
        except (ControllerError, WindowTooLarge) as exc:
            return render(request, "error_page.html", principal, status=400,
                          title="Cannot make the report", message=str(exc))
        headers = {**SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="{name}"'}
        return Response(body, media_type=media, headers=headers)

    return router


def report_response(deps: UiDeps, principal: Principal, since: str | None, until: str | None,
                    fmt: str) -> tuple[bytes, str, str]:
    """(body, media type, file name) of a report; shared by /ui/report and /v1/report."""
    if fmt not in FORMATS:
        raise InputError(f"format {fmt!r}: use one of {', '.join(FORMATS)}")
    window = parse_window(since, until, deps.ctl.clock())
    report = make_report(deps.ctl, window, verify=deps.verify.get(), plans=deps.plans,
                         checkpoints=deps.checkpoints,
                         generated_by=f"{principal.user} ({principal.role.name})")
    render: dict[str, Callable[[], bytes]] = {
        "html": lambda: to_html(deps.env, report).encode("utf-8"),
        "pdf": lambda: to_pdf(deps.env, report),
        "csv": lambda: to_csv(report).encode("utf-8"),
        "json": lambda: to_json(report).encode("utf-8"),
    }
    return render[fmt](), FORMATS[fmt], filename(report, fmt)
