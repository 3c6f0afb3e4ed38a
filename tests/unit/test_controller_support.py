"""Fakes for controller unit tests: agents that live in memory, sessions that reach them.

(A module named test_* so it sits with the controller tests; it holds no tests itself.)
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.auth import Principal, Role
from controller.config import ControllerConfig, SshSettings
from controller.errors import AgentError, HostKeyMismatch, HostKeyUnknown, TransportError
from controller.plan_service import PlanStatus
from controller.service import Controller
from controller.transport.ssh import SshTarget

MUTATING = ("isolate", "restore", "allow", "extend", "revoke")
KEY_A = "SHA256:" + "A" * 43
KEY_B = "SHA256:" + "B" * 43


@dataclass
class FakeAgent:
    name: str
    host_key: str = KEY_A
    up: bool = True
    state: str = "open"
    profile: str | None = None
    generation: int = 0
    actor: str = "system"
    reason: str = ""
    verified: bool = True
    delay: float = 0.0
    status_delay: float = 0.0  # a slow status (a poll that takes long)
    plain_status_only: bool = False  # an agent from before `status {"elements": false}`
    epoch: int = 0  # bumping it kills open sessions (sshd restarted)
    unnoticed: bool = False  # a killed session still looks alive until it is used
    fail: dict[str, tuple[str, str]] = field(default_factory=dict)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    connects: int = 0
    auth_attempts: int = 0
    drift_repairs: int = 0
    exceptions: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    active: int = 0
    max_active: int = 0
    # like the real agent (agent/rpc.py): remembered request ids of mutating requests,
    # the journal (with request ids and audit hashes), checkpoints received
    journal: list[dict[str, Any]] = field(default_factory=list)
    seen_ids: dict[str, tuple[str, dict[str, Any], Any]] = field(default_factory=dict)
    knows_checkpoints: bool = True
    replays: list[str] = field(default_factory=list)  # request ids answered, not applied
    probe_results: dict[str, bool] = field(default_factory=dict)  # probe name -> ok
    profiles: list[str] = field(default_factory=lambda: ["internet", "full"])

    def _verification(self) -> dict[str, Any]:
        ok = self.verified
        return {"status": "verified" if ok else "unverified", "checked_at": time.time(),
                "failing": [] if ok else ["outside-web"], "detail": []}

    def change(self, action: str) -> dict[str, Any]:
        return {"action": action, "gateway": self.name, "state": self.state,
                "profile": self.profile, "changed": True, "in_sync": True, "problems": [],
                "verification": self._verification(), "apply_seconds": 0.001,
                "generation": self.generation, "note": ""}

    def handle(self, op: str, args: dict[str, Any], request_id: str | None = None,
               audit: str | None = None) -> Any:
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.delay and op not in ("checkpoint", "journal"):
                time.sleep(self.delay)
            with self.lock:
                if op in ("checkpoint", "journal"):
                    return self._bookkeeping(op, args)
                self.calls.append((op, args))
                if op in MUTATING and request_id and request_id in self.seen_ids:
                    first_op, first_args, answer = self.seen_ids[request_id]
                    if (first_op, first_args) != (op, args):
                        raise AgentError(f"{self.name}: request id {request_id} was used for "
                                         "another request", code="conflict")
                    self.replays.append(request_id)
                    return {**answer, "replayed": True}
                if op in self.fail:
                    code, message = self.fail[op]
                    if op in MUTATING:
                        self._journal(op, "failed", request_id, audit, args)
                    raise AgentError(f"{self.name}: {message}", code=code)
                if op == "status" and args and self.plain_status_only:
                    raise AgentError(f"{self.name}: status arguments: extra inputs are not "
                                     "permitted", code="bad_request")
                answer = self._apply(op, args)
                if op in MUTATING:
                    self._journal(op, "applied", request_id, audit, args)
                    if request_id:
                        self.seen_ids[request_id] = (op, args, answer)
            if op == "status" and self.status_delay:
                time.sleep(self.status_delay)  # read first, answered late: like a real one
            return answer
        finally:
            with self.lock:
                self.active -= 1

    @property
    def request_ids(self) -> list[str | None]:
        """The request ids of the changes applied, in order (the journal's)."""
        return [e["request_id"] for e in self.journal if e["result"] == "applied"]

    def _journal(self, action: str, result: str, request_id: str | None, audit: str | None,
                 args: dict[str, Any]) -> None:
        self.journal.append({
            "time": time.time(), "action": action, "result": result, "profile": self.profile,
            "actor": args.get("actor", "?"), "reason": args.get("reason", ""),
            "ticket": args.get("ticket"), "request_id": request_id, "audit": audit,
            "generation": self.generation,
            "verification": ("verified" if self.verified else "unverified")
            if result == "applied" else None})

    def _bookkeeping(self, op: str, args: dict[str, Any]) -> Any:
        if op == "journal":
            since = args.get("since")
            entries = [e for e in self.journal if since is None or e["time"] >= since]
            return {"entries": entries[-int(args.get("limit", 50)):]}
        if not self.knows_checkpoints:
            raise AgentError(f"{self.name}: request: op: Input should be 'ping', 'status', ...",
                             code="bad_request")
        self.journal.append({"time": time.time(), "action": "checkpoint", "result": "recorded",
                             "actor": "controller", "reason": "", "request_id": None,
                             "audit": None, **{k: args[k] for k in (
                                 "seq", "head_hash", "signature", "key_id")},
                             "checkpoint_time": args["time"]})
        return {"gateway": self.name, "recorded": True}

    def _apply(self, op: str, args: dict[str, Any]) -> Any:
        if op == "ping":
            return {"gateway": self.name, "protocol": 1}
        if op == "status":
            return {"gateway": self.name, "state": self.state, "profile": self.profile,
                    "since": 0.0, "actor": self.actor, "reason": self.reason, "in_sync": True,
                    "problems": [], "verification": self._verification(),
                    "exceptions": self.exceptions, "generation": self.generation,
                    "drift_repairs": self.drift_repairs, "profiles": self.profiles,
                    "agent_version": "0.0-fake", "config_digest": "sha256:fake"}
        if op == "isolate":
            self.state, self.profile = "isolated", args.get("profile", "internet")
        elif op == "restore":
            self.state, self.profile = "open", None
        elif op == "allow":
            flow = {k: args[k] for k in ("cidr", "proto", "ports", "direction")}
            self.exceptions.append({
                "id": f"{len(self.exceptions):012x}", "flow": flow, "actor": args["actor"],
                "reason": args["reason"], "expires_at": time.time() + args["duration_seconds"],
                "remaining_seconds": args["duration_seconds"]})
        elif op == "exceptions":
            return {"gateway": self.name, "exceptions": list(self.exceptions)}
        elif op in ("extend", "revoke"):
            found = [e for e in self.exceptions if e["id"] == args["id"]]
            if not found:
                raise AgentError(f"{self.name}: no live exception {args['id']!r}",
                                 code="bad_request")
            if op == "revoke":
                self.exceptions.remove(found[0])
            else:
                found[0]["remaining_seconds"] = args["duration_seconds"]
        elif op == "probe":
            probes = {"outside-web": self.verified, **self.probe_results}
            return {"probes": [{"name": name, "ok": ok, "type": "tcp",
                                "target": "198.51.100.10:443", "outcome": "unreachable",
                                "expected": "unreachable"} for name, ok in probes.items()]}
        else:
            raise AgentError(f"unsupported op {op}", code="bad_request")
        self.generation += 1
        self.actor, self.reason = args.get("actor", "?"), args.get("reason", "")
        return self.change(op)

    def local_change(self, profile: str | None, actor: str = "root@console") -> None:
        """Break-glass on the box itself (the agent's own CLI: a cli-<hex> request id)."""
        with self.lock:
            self.state = "isolated" if profile else "open"
            self.profile = profile
            self.generation += 1
            self.actor, self.reason = actor, "break-glass"
            self._journal("isolate" if profile else "restore", "applied",
                          f"cli-{secrets.token_hex(8)}", None,
                          {"actor": actor, "reason": "break-glass"})


class FakeSession:
    def __init__(self, fleet: FakeFleet, target: SshTarget) -> None:
        self.fleet = fleet
        self.target = target
        self.host_key_seen: str | None = None
        self.epoch: int | None = None
        self.lanes: list[str] = []

    @property
    def agent(self) -> FakeAgent:
        return self.fleet.agents[self.target.name]

    @property
    def alive(self) -> bool:
        if self.epoch is None:
            return False
        if self.agent.unnoticed:
            return True
        return self.agent.up and self.agent.epoch == self.epoch

    def _really_alive(self) -> bool:
        return self.epoch is not None and self.agent.up and self.agent.epoch == self.epoch

    def connect(self) -> None:
        agent = self.agent
        if not agent.up:
            raise TransportError(f"{self.target.name}: connection refused (is sshd running?)")
        self.host_key_seen = agent.host_key
        if self.target.host_key is None and not self.target.trust_on_first_use:
            raise HostKeyUnknown("no key pinned", expected=None, presented=agent.host_key)
        if self.target.host_key is not None and self.target.host_key != agent.host_key:
            raise HostKeyMismatch(f"{self.target.name}: HOST KEY MISMATCH",
                                  expected=self.target.host_key, presented=agent.host_key)
        agent.auth_attempts += 1
        agent.connects += 1
        self.epoch = agent.epoch

    def request(self, op: str, args: dict[str, Any], *, timeout: float | None = None,
                lane: str = "command", request_id: str | None = None,
                audit: str | None = None) -> Any:
        self.lanes.append(lane)
        if not self._really_alive():
            self.epoch = None
            raise TransportError(f"{self.target.name}: the agent session ended",
                                 code="connection_lost")
        return self.agent.handle(op, args, request_id, audit)

    def close(self) -> None:
        self.epoch = None


class FakeFleet:
    def __init__(self, names: list[str]) -> None:
        self.agents = {n: FakeAgent(n) for n in names}

    def factory(self, target: SshTarget, settings: SshSettings) -> FakeSession:
        del settings
        return FakeSession(self, target)


ADMIN = Principal(user="alice", role=Role.admin, token_id="t-admin")
OPERATOR = Principal(user="olga", role=Role.operator, token_id="t-op")
VIEWER = Principal(user="vic", role=Role.viewer, token_id="t-view")


def make_config(tmp: Path, *, db_url: str, **overrides: Any) -> ControllerConfig:
    data: dict[str, Any] = {
        "state_dir": str(tmp / "state"),
        "database_url": db_url,
        "ssh": {"backoff_initial": 0.01, "backoff_max": 0.05, "request_timeout": 5},
        "fleet": {"parallelism": 8},
        "poll": {"enabled": False},
        # as replicas (PostgreSQL): quick leases, so that tests do not wait for them
        "replicas": {"lease_ttl_seconds": 2.0, "renew_interval_seconds": 0.3,
                     "queue_poll_seconds": 0.02},
    }
    data.update(overrides)
    return ControllerConfig.model_validate(data)


def make_controller(tmp: Path, fakes: FakeFleet, *, db_url: str,
                    keyfile: Path | None = None, add: bool = True,
                    **overrides: Any) -> Controller:
    """A controller on the store under test (`db_url`, from the parametrized fixture)."""
    ctl = Controller(make_config(tmp, db_url=db_url, **overrides),
                     session_factory=fakes.factory).open()
    if add:
        key = keyfile or write_key(tmp)
        for i, name in enumerate(fakes.agents):
            ctl.add_gateway(ADMIN, name=name, address=f"10.99.0.{100 + i}", user="root",
                            key_path=str(key), host_key=KEY_A, trust_on_first_use=False,
                            groups=["even" if i % 2 == 0 else "odd"], reason="test",
                            ticket=None)
    return ctl.start()


def write_key(tmp: Path) -> Path:
    """A real (throwaway) ed25519 private key, since `gateway add` loads it."""
    import paramiko

    path = tmp / "id_ed25519"
    if not path.exists():
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption())
        path.write_bytes(pem)
        path.chmod(0o600)
        paramiko.PKey.from_path(str(path))
    return path


def settle(ctl: Controller, plan_id: str, *, timeout: float = 20.0,
           until: Callable[[PlanStatus], bool] | None = None) -> PlanStatus:
    """Drive the plan on the test's thread (after any tick a control action kicked off)
    until `until` holds; by default until it is finished, paused, or a stage awaits
    approval. Returns its state then (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        ctl.plans.driver.wait()
        ctl.plans.driver.tick()
        status = ctl.plans.get(plan_id)
        if until is not None:
            if until(status):
                return status
        elif status.state in ("done", "failed", "aborted", "paused") or any(
                s.state == "awaiting approval" for s in status.stages):
            return status
        if time.monotonic() > deadline:
            return status
        time.sleep(0.02)
