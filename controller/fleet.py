"""Fan-out: one request to many gateways, in parallel, each with its own result.

Like nornir's per-host results: a gateway that is down, refuses, or fails
gets a result that says so, and never aborts the others. Work for one
gateway runs in acceptance order (TurnLock), so concurrent commands on the
same gateway are serialised and the last accepted one decides its state.
The pool is bounded; submission happens in turn order, so a queued task
only ever waits for tasks submitted before it and the pool cannot deadlock.

Background work (status polls) has its own bounded pool and takes no turn: it
runs on the poll lane of each gateway's session, beside any command, so a
command never waits for a poll.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from controller.errors import AgentError, ControllerError, TransportError
from controller.inventory import Gateway
from controller.transport.link import GatewayLink, LinkRegistry
from controller.transport.protocol import AgentChange

log = logging.getLogger("drawbridge.controller.fleet")

Outcome = Literal["verified", "applied", "unverified", "failed", "unreachable", "refused"]
OK_OUTCOMES = ("verified", "applied")
CHANGE_OPS = ("isolate", "restore", "allow", "extend", "revoke")
EXCEPTION_OPS = ("allow", "extend", "revoke")  # change exceptions, not the state


class GatewayResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    gateway: str
    op: str
    outcome: Outcome
    ok: bool
    message: str = ""
    error_code: str | None = None
    state: str | None = None
    profile: str | None = None
    verification: str | None = None
    failing: list[str] = []
    in_sync: bool | None = None
    generation: int | None = None
    apply_seconds: float | None = None
    duration_seconds: float = 0.0
    will_retry: bool = False
    result: dict[str, Any] | None = None


def classify(gateway: str, op: str, result: Any, duration: float) -> GatewayResult:
    """An agent's successful answer as a per-gateway result (pure)."""
    if op in CHANGE_OPS:
        try:
            change = AgentChange.model_validate(result)
        except ValidationError as exc:
            return GatewayResult(gateway=gateway, op=op, outcome="failed", ok=False,
                                 error_code="protocol_error", duration_seconds=duration,
                                 message=f"unexpected answer from the agent: {exc.errors()[0]}")
        v = change.verification
        if not change.in_sync:
            outcome: Outcome = "unverified"
            message = "applied, but the ruleset read back differs: " + "; ".join(change.problems)
        elif v.status == "verified":
            outcome, message = "verified", "applied and verified"
        elif v.status == "unverified":
            outcome = "unverified"
            message = "applied, but verification failed: " + ", ".join(v.failing or ["?"])
        else:
            outcome, message = "applied", change.note or "applied"
        return GatewayResult(
            gateway=gateway, op=op, outcome=outcome, ok=outcome in OK_OUTCOMES, message=message,
            state=change.state, profile=change.profile, verification=v.status,
            failing=list(v.failing), in_sync=change.in_sync, generation=change.generation,
            apply_seconds=change.apply_seconds, duration_seconds=duration,
            result=result if isinstance(result, dict) else None)
    if op == "probe":
        probes = result.get("probes", []) if isinstance(result, dict) else []
        failing = [str(p.get("name", "?")) for p in probes
                   if isinstance(p, dict) and not p.get("ok")]
        if not probes:
            outcome, message = "applied", str(result.get("note", "no probes configured")) \
                if isinstance(result, dict) else "no probes"
        elif failing:
            outcome, message = "unverified", "probes disagree: " + ", ".join(failing)
        else:
            outcome, message = "verified", f"{len(probes)} probes as expected"
        return GatewayResult(gateway=gateway, op=op, outcome=outcome, ok=outcome in OK_OUTCOMES,
                             message=message, failing=failing, duration_seconds=duration,
                             result=result if isinstance(result, dict) else None)
    return GatewayResult(gateway=gateway, op=op, outcome="applied", ok=True, message="ok",
                         duration_seconds=duration,
                         result=result if isinstance(result, dict) else {"value": result})


def failure(gateway: str, op: str, exc: ControllerError, duration: float) -> GatewayResult:
    if isinstance(exc, TransportError):
        outcome: Outcome = "unreachable" if exc.retryable else "refused"
    else:
        outcome = "failed"
    return GatewayResult(gateway=gateway, op=op, outcome=outcome, ok=False, message=exc.message,
                         error_code=exc.code, duration_seconds=duration)


ResultHook = Callable[[Gateway, GatewayLink, GatewayResult], GatewayResult]


class Fleet:
    def __init__(self, links: LinkRegistry, *, parallelism: int,
                 background_parallelism: int | None = None) -> None:
        self.links = links
        self.parallelism = parallelism
        self._pool = ThreadPoolExecutor(max_workers=parallelism, thread_name_prefix="fanout")
        # polls get their own pool: a command never queues behind background work
        self._bg_pool = ThreadPoolExecutor(max_workers=background_parallelism or parallelism,
                                           thread_name_prefix="poll")
        self._accept = threading.Lock()

    def run(
        self,
        gateways: Sequence[Gateway],
        op: str,
        args_for: Callable[[Gateway], dict[str, Any]],
        *,
        after: ResultHook | None = None,
        on_result: Callable[[GatewayResult], None] | None = None,
        timeout: float | None = None,
        accept: Callable[[Sequence[Gateway]], Sequence[Gateway]] | None = None,
        request_id: str | None = None,
        audit: str | None = None,
    ) -> list[GatewayResult]:
        """Run `op` on every gateway; results in the order of `gateways`.

        `accept` runs while no other command can be accepted: it records the command
        and may drop gateways (e.g. a retry that a newer command made moot), so that
        acceptance order, turn order and the recorded intent always agree.
        `request_id` and `audit` go into each request's envelope (the command id and its
        `requested` record's hash: the agent journals both with the change)."""
        futures: dict[Future[GatewayResult], int] = {}
        with self._accept:
            if accept is not None:
                gateways = list(accept(gateways))
            for i, fut in enumerate(self.submit(gateways, op, args_for, after=after,
                                                timeout=timeout, request_id=request_id,
                                                audit=audit)):
                futures[fut] = i
        results: list[GatewayResult | None] = [None] * len(gateways)
        for fut in as_completed(futures):
            res = fut.result()
            results[futures[fut]] = res
            if on_result is not None:
                try:
                    on_result(res)
                except Exception:
                    log.exception("progress callback failed")
        return [r for r in results if r is not None]

    def submit(self, gateways: Sequence[Gateway], op: str,
               args_for: Callable[[Gateway], dict[str, Any]], *,
               after: ResultHook | None = None, timeout: float | None = None,
               request_id: str | None = None, audit: str | None = None,
               guard: Callable[[Gateway], None] | None = None,
               ) -> list[Future[GatewayResult]]:
        """Start `op` on every gateway, each in its turn (taken now, in the order given:
        call in acceptance order); the futures, in the order of `gateways`. `guard` runs
        in the turn, right before the request: if it raises a ControllerError, nothing is
        sent, the result says why and `after` is not called."""
        futures = []
        for gw in gateways:
            link = self.links.get(gw)
            turn = link.turns.take()
            try:
                fut = self._pool.submit(self._one, gw, link, turn, op, args_for(gw), after,
                                        timeout, request_id, audit, guard)
            except Exception:
                link.turns.cancel(turn)
                raise
            futures.append(fut)
        return futures

    def _one(self, gw: Gateway, link: GatewayLink, turn: int, op: str, args: dict[str, Any],
             after: ResultHook | None, timeout: float | None, request_id: str | None = None,
             audit: str | None = None,
             guard: Callable[[Gateway], None] | None = None) -> GatewayResult:
        started = time.perf_counter()
        with link.turns.turn(turn):
            if guard is not None:
                try:
                    guard(gw)
                except ControllerError as exc:
                    return failure(gw.name, op, exc, time.perf_counter() - started)
            try:
                value = link.call(op, args, timeout=timeout, request_id=request_id,
                                  audit=audit)
                res = classify(gw.name, op, value, time.perf_counter() - started)
            except (TransportError, AgentError) as exc:
                res = failure(gw.name, op, exc, time.perf_counter() - started)
            except ControllerError as exc:
                res = failure(gw.name, op, exc, time.perf_counter() - started)
            except Exception as exc:
                log.exception("%s on %s failed", op, gw.name)
                res = failure(gw.name, op, ControllerError(f"internal error: {exc!r}",
                                                           code="internal"),
                              time.perf_counter() - started)
            if after is not None:
                try:
                    res = after(gw, link, res)
                except Exception:
                    log.exception("result hook for %s failed", gw.name)
        return res

    def background(self, gw: Gateway,
                   fn: Callable[[Gateway, GatewayLink], Any]) -> Future[Any]:
        """`fn` for one gateway on the background pool (no turn; see map_background)."""
        return self._bg_pool.submit(fn, gw, self.links.get(gw))

    def map_background(self, gateways: Sequence[Gateway],
                       fn: Callable[[Gateway, GatewayLink], Any]) -> list[Any]:
        """Background work (polls): `fn` for each gateway on the background pool, beside
        whatever commands run there (it takes no turn); None where it raised."""
        def task(gw: Gateway) -> Any:
            return fn(gw, self.links.get(gw))

        futures = [self._bg_pool.submit(task, gw) for gw in gateways]
        out = []
        for fut in futures:
            try:
                out.append(fut.result())
            except Exception:
                log.exception("background task failed")
                out.append(None)
        return out

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._bg_pool.shutdown(wait=False, cancel_futures=True)
