"""The HTTP API (FastAPI; OpenAPI schema at /openapi.json, docs at /docs).

Authentication happens in a small ASGI middleware, before a body is read:
no token, a bad token or a revoked one is a 401; a body over the limit is a
413. Roles are checked per route (403). Every refusal is audited. Commands
answer with one JSON result, or, when the client sends
`Accept: application/x-ndjson`, with a stream of events (accepted, one result
per gateway as it arrives, done), which is how the CLI draws its progress bar.
A command runs to the end and is audited even if the client goes away.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import queue
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Annotated, Any, Literal

import anyio
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from controller.api_audit import audit_router
from controller.api_deps import Admin, Operator, Viewer, client_address
from controller.api_inventory import inventory_router
from controller.api_plans import plans_router
from controller.audit import HistoryQuery
from controller.auth import Principal
from controller.command_path import Emit
from controller.errors import ControllerError, InputError, Unauthorized
from controller.fleet import GatewayResult
from controller.plan_service import PlanStatus
from controller.schemas import (
    AllowBody,
    CommandResult,
    ErrorResponse,
    ExtendBody,
    GatewayView,
    Health,
    HistoryResponse,
    IsolateBody,
    ProbeBody,
    RestoreBody,
    RevokeBody,
    Targets,
)
from controller.service import Controller
from controller.timeparse import parse_when
from controller.web.annotations import to_annotations
from controller.web.loading import VerifyCache, WindowTooLarge
from controller.web.report_formats import FORMATS
from controller.web.routes import UiDeps, report_response, ui_router
from controller.web.session import new_secret
from controller.web.sources import DbCheckpointSource, DbPlanSource
from controller.web.templating import make_env
from controller.web.window import parse_window

log = logging.getLogger("drawbridge.controller.api")

NDJSON = "application/x-ndjson"
OPEN_PATHS = frozenset({"/v1/health", "/openapi.json", "/docs", "/docs/oauth2-redirect",
                        "/redoc"})
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _millis(value: str | None) -> str | None:
    """Grafana sends epoch milliseconds; parse_when takes seconds (or '2h', ISO)."""
    if value is not None and value.isdigit() and len(value) >= 12:
        return str(int(value) / 1000)
    return value


def _error(status: int, code: str, message: str,
           details: list[dict[str, Any]] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={
        "error": {"code": code, "message": message, "details": details or []}})


class GateMiddleware:
    """401 before anything is read; 413 for oversize bodies (declared or streamed)."""

    def __init__(self, app: ASGIApp, ctl: Controller) -> None:
        self.app = app
        self.ctl = ctl
        self.limit = ctl.config.api.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        method = scope.get("method", "GET")
        # /ui authenticates its own session cookie (the page redirects to its login form)
        open_path = path in OPEN_PATHS or path == "/ui" or path.startswith("/ui/") or (
            path == "/metrics" and not self.ctl.config.api.metrics_require_token)
        principal: Principal | None = None
        source = client_address(scope)
        if not open_path:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                       for k, v in scope.get("headers", [])}
            auth = headers.get("authorization", "")
            token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
            try:
                principal = await anyio.to_thread.run_sync(
                    lambda: self.ctl.authenticate(token, path=f"{method} {path}",
                                                  source=source))
            except Unauthorized as exc:
                await _error(401, exc.code, exc.message)(scope, receive, send)
                return
            scope.setdefault("state", {})["principal"] = principal
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._too_large(principal, source, method, path, scope, receive, send)
            return
        # Read the whole body here (it is small by contract) so that an oversize one is
        # refused before any route sees a byte of it, whether or not it was declared.
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break  # client went away
            body += message.get("body", b"")
            more = bool(message.get("more_body", False))
            if len(body) > self.limit:
                await self._too_large(principal, source, method, path, scope, receive,
                                      send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, principal: Principal | None, source: str, method: str,
                         path: str, scope: Scope, receive: Receive, send: Send) -> None:
        exc = ControllerError(f"the request body exceeds {self.limit} bytes", code="too_large")
        await anyio.to_thread.run_sync(
            lambda: self.ctl.refused(principal, f"{method} {path}", exc, source=source))
        await _error(413, exc.code, exc.message)(scope, receive, send)


def _run_stream(ctl: Controller, run: Callable[[Emit], BaseModel]) -> StreamingResponse:
    """Run a command on the controller's bounded stream pool (fleet.stream_workers; more
    streamed commands at once wait for a worker); stream its events as NDJSON lines."""
    events: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def worker() -> None:
        try:
            result = run(events.put)
            events.put({"event": "done", "result": result.model_dump(mode="json")})
        except ControllerError as exc:
            events.put({"event": "error", "error": {"code": exc.code, "message": exc.message}})
        except Exception as exc:
            log.exception("command failed")
            events.put({"event": "error",
                        "error": {"code": "internal", "message": f"internal error: {exc!r}"}})
        finally:
            events.put(None)

    ctl.streams.submit(worker)

    def lines() -> Iterator[str]:
        while (item := events.get()) is not None:
            yield json.dumps(item, default=str) + "\n"

    return StreamingResponse(lines(), media_type=NDJSON)


def _wants_stream(request: Request) -> bool:
    return NDJSON in request.headers.get("accept", "")


def _ui_secret(ctl: Controller) -> bytes:
    """The page's CSRF secret. Replicas share it (derived from the audit key they all
    hold), so that a form from one replica is accepted by another behind a load
    balancer; one controller alone keeps a fresh one per process, as before."""
    if ctl.replicas is None:
        return new_secret()
    return hmac.new(ctl.audit.key, b"drawbridge /ui csrf secret v1", hashlib.sha256).digest()


def describe_invalid(error: Any) -> str:
    """One validation error in words: the field and the problem; a body that is not JSON
    says so and where (FastAPI's location is then a character offset, not a field)."""
    loc = [str(p) for p in error.get("loc", ())]
    if error.get("type") == "json_invalid":
        where = f" at character {loc[1]}" if len(loc) > 1 else ""
        cause = (error.get("ctx") or {}).get("error", "")
        return f"the body is not valid JSON{where}" + (f" ({cause})" if cause else "")
    field = ".".join(loc[1:] or loc)
    return f"{field}: {str(error.get('msg', '')).removeprefix('Value error, ')}"


def create_app(ctl: Controller) -> FastAPI:
    app = FastAPI(
        title="Drawbridge controller",
        version="1",
        description="Isolate and restore gateways fleet-wide over SSH, with an audit trail. "
                    "Authenticate with 'Authorization: Bearer <token>'. Commands stream NDJSON "
                    "events when asked with 'Accept: application/x-ndjson'.",
        responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse},
                   413: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
    )
    app.add_middleware(GateMiddleware, ctl=ctl)
    app.state.controller = ctl
    ui = UiDeps(ctl=ctl, env=make_env(), secret=_ui_secret(ctl),
                plans=DbPlanSource(ctl.plans.store),
                checkpoints=DbCheckpointSource(ctl.checkpoints.store),
                verify=VerifyCache(ctl.verify_audit, ctl.audit.last_seq))
    app.include_router(ui_router(ui))
    app.include_router(audit_router(ctl))
    app.include_router(plans_router(ctl))
    app.include_router(inventory_router(ctl))

    @app.exception_handler(ControllerError)
    async def _controller_error(request: Request, exc: ControllerError) -> JSONResponse:
        return _error(exc.http_status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [{"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg", "")}
                   for e in exc.errors()]
        message = "invalid request: " + "; ".join(describe_invalid(e) for e in exc.errors()[:5])
        principal = getattr(request.state, "principal", None)
        refusal = InputError(message)
        await anyio.to_thread.run_sync(lambda: ctl.refused(
            principal if isinstance(principal, Principal) else None,
            f"{request.method} {request.url.path}", refusal,
            source=client_address(request.scope)))
        return _error(422, "bad_request", message, details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, "http_error", str(exc.detail))

    @app.get("/v1/health", response_model=Health, tags=["meta"])
    def health() -> Health:
        return Health(status="ok", gateways=len(ctl.inventory.all()),
                      schema_version=ctl.db.schema_version(),
                      audit_records=ctl.audit.last_seq(),
                      audit_alarm=ctl.audit.alarm.problem if ctl.audit.alarm else None)

    @app.get("/metrics", tags=["meta"], response_class=Response)
    def metrics() -> Response:
        return Response(generate_latest(ctl.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/whoami", tags=["meta"])
    def whoami(p: Viewer) -> dict[str, str]:
        return {"user": p.user, "role": p.role.name}

    @app.get("/v1/replicas", tags=["meta"])
    def replicas(p: Viewer) -> dict[str, Any]:
        """The controllers sharing the database (README: "Replicas"): heartbeats, and
        how many gateways each holds; `me`: the one answering."""
        if ctl.replicas is None:
            return {"replica_mode": False, "me": None, "replicas": []}
        return {"replica_mode": True, "me": ctl.replicas.me.replica_id,
                "replicas": [dataclasses.asdict(r) for r in ctl.replicas.overview()]}

    @app.get("/v1/status", response_model=list[GatewayView], tags=["state"])
    def status(p: Viewer, refresh: bool = False) -> list[GatewayView]:
        if refresh:
            ctl.refresh(actor=p.user)
        return ctl.views()

    # -- commands --------------------------------------------------------------------------

    @app.post("/v1/isolate", response_model=CommandResult, tags=["commands"])
    def isolate(body: IsolateBody, p: Operator, request: Request) -> Any:
        gateways = ctl.select(p, body.targets, "isolate")
        ctl.check_profile(p, gateways, body.profile)

        def run(emit: Emit) -> CommandResult:
            return ctl.run_command(gateways, action="isolate", op="isolate", actor=p.user,
                                   reason=body.reason, ticket=body.ticket,
                                   args={"profile": body.profile}, emit=emit)
        return _run_stream(ctl, run) if _wants_stream(request) else run(lambda e: None)

    @app.post("/v1/restore", response_model=CommandResult | PlanStatus, tags=["commands"])
    def restore(body: RestoreBody, p: Admin, request: Request) -> Any:
        """Restore now; with a `plan`: start that plan (stored and driven by the
        controller, as POST /v1/plans) and answer with its state."""
        plan = body.plan
        if plan is not None:
            return ctl.plans.start(p, body.targets, plan, reason=body.reason,
                                   ticket=body.ticket, start=body.from_stage,
                                   through=body.through_stage)
        gateways = ctl.select(p, body.targets, "restore")

        def run(emit: Emit) -> BaseModel:
            return ctl.run_command(gateways, action="restore", op="restore", actor=p.user,
                                   reason=body.reason, ticket=body.ticket, args={},
                                   emit=emit)
        return _run_stream(ctl, run) if _wants_stream(request) else run(lambda e: None)

    @app.post("/v1/allow", response_model=CommandResult, tags=["commands"])
    def allow(body: AllowBody, p: Operator, request: Request) -> Any:
        """Open one exact flow until it expires. An operator may open at most a /24
        (IPv4) or /48 (IPv6) by default (`[exceptions]`); wider needs an admin;
        0.0.0.0/0 and ::/0 are refused."""
        ctl.check_exception_breadth(p, "allow", body.cidr)
        gateways = ctl.select(p, body.targets, "allow")
        flow = {"cidr": str(body.cidr), "proto": body.proto,
                "ports": [lo if lo == hi else f"{lo}-{hi}" for lo, hi in body.ports],
                "direction": body.direction, "duration_seconds": body.duration_seconds}

        def run(emit: Emit) -> CommandResult:
            return ctl.run_command(gateways, action="allow", op="allow", actor=p.user,
                                   reason=body.reason, ticket=body.ticket, args=flow, emit=emit)
        return _run_stream(ctl, run) if _wants_stream(request) else run(lambda e: None)

    @app.get("/v1/exceptions", response_model=list[GatewayResult], tags=["commands"])
    def exceptions(p: Viewer, gateway: Annotated[list[str], Query()]) -> Any:
        """The live exceptions of these gateways, asked now (`result.exceptions`)."""
        try:
            targets = Targets(gateways=tuple(gateway))
        except ValueError as exc:
            raise InputError(f"gateway: {exc}") from None
        return ctl.exceptions(p, targets)

    @app.post("/v1/allow/extend", response_model=CommandResult, tags=["commands"])
    def extend(body: ExtendBody, p: Operator) -> Any:
        """Give one live exception a new lifetime from now (same breadth rule as allow)."""
        return ctl.change_exception(p, "extend", gateway=body.gateway, exception_id=body.id,
                                    reason=body.reason, ticket=body.ticket,
                                    duration_seconds=body.duration_seconds)

    @app.post("/v1/allow/revoke", response_model=CommandResult, tags=["commands"])
    def revoke(body: RevokeBody, p: Operator) -> Any:
        """Close one live exception now."""
        return ctl.change_exception(p, "revoke", gateway=body.gateway, exception_id=body.id,
                                    reason=body.reason, ticket=body.ticket)

    @app.post("/v1/probe", response_model=CommandResult, tags=["commands"])
    def probe(body: ProbeBody, p: Operator, request: Request) -> Any:
        gateways = ctl.select(p, body.targets, "probe")

        def run(emit: Emit) -> CommandResult:
            return ctl.run_command(gateways, action="probe", op="probe", actor=p.user,
                                   reason=body.reason or "probe", ticket=None, args={},
                                   emit=emit)
        return _run_stream(ctl, run) if _wants_stream(request) else run(lambda e: None)

    # -- history and audit -----------------------------------------------------------------

    @app.get("/v1/history", response_model=HistoryResponse, tags=["audit"])
    def history(
        p: Viewer,
        gateway: str | None = None,
        since: str | None = None,
        until: str | None = None,
        actor: str | None = None,
        action: str | None = None,
        command_id: str | None = None,
        limit: Annotated[int, Query(ge=1, le=100_000)] = 1000,
    ) -> HistoryResponse:
        now = ctl.clock()
        query = HistoryQuery(
            gateway=gateway, actor=actor, action=action, command_id=command_id, limit=limit,
            since=parse_when(since, now) if since else None,
            until=parse_when(until, now) if until else None)
        return HistoryResponse(records=ctl.history(query))

    @app.get("/v1/report", tags=["audit"], response_class=Response,
             responses={200: {"content": {m: {} for m in FORMATS.values()}}})
    def report(p: Viewer, since: str | None = None, until: str | None = None,
               format: Literal["html", "pdf", "csv", "json"] = "json") -> Response:
        """The incident report of [since, until] (default: the last 24 h)."""
        try:
            body, media, name = report_response(ui, p, since, until, format)
        except WindowTooLarge as exc:
            raise InputError(str(exc)) from None
        return Response(body, media_type=media,
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @app.get("/v1/annotations", tags=["audit"])
    def grafana_annotations(p: Viewer, from_: Annotated[str | None, Query(alias="from")] = None,
                            to: str | None = None, gateway: str | None = None,
                            limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
                            ) -> list[dict[str, Any]]:
        """Isolate/restore/exception/plan-stage annotations for Grafana (JSON or Infinity
        data source); from/to in epoch milliseconds (Grafana's ${__from}, ${__to}) or as
        for /v1/history."""
        now = ctl.clock()
        window = parse_window(_millis(from_), _millis(to), now)
        records = ctl.history(HistoryQuery(since=window.since, until=window.until,
                                           gateway=gateway, limit=limit))
        return to_annotations(records)

    return app
