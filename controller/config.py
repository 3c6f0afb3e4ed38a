"""Controller configuration (TOML), validated with precise errors.

Every key has a default, so a controller runs without a file (SQLite under
the state dir, API on 127.0.0.1:8630). See deploy/examples/controller.toml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from agent.config import format_validation_error, parse_listen, read_toml
from agent.errors import ConfigError as AgentConfigError
from controller.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/drawbridge/controller.toml")
DEFAULT_STATE_DIR = Path("/var/lib/drawbridge-controller")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SshSettings(_Model):
    connect_timeout: float = Field(default=5.0, gt=0, le=120)
    request_timeout: float = Field(default=60.0, gt=0, le=3600)
    keepalive_seconds: int = Field(default=15, ge=0, le=3600)
    # Liveness while a request waits (see controller/transport/liveness.py): after every
    # `alive_interval` seconds of silence sshd is asked whether it is there (an SSH global
    # request it answers itself, however busy the agent is); `alive_count_max` questions
    # in a row without an answer and the gateway is unreachable: a dead link is found
    # within alive_interval * (alive_count_max + 1) seconds (default 8), while an agent
    # that is slow but alive still gets the whole request_timeout. 0 switches it off.
    alive_interval: float = Field(default=2.0, ge=0, le=600)
    alive_count_max: int = Field(default=3, ge=1, le=100)
    backoff_initial: float = Field(default=1.0, gt=0, le=600)
    backoff_max: float = Field(default=60.0, gt=0, le=3600)
    # The forced command on the gateway replaces whatever is asked for; this is
    # only what the controller asks, so a key without a forced command still
    # runs the agent and nothing else.
    remote_command: str = "drawbridge-agent rpc"
    max_response_bytes: int = Field(default=16 * 1024 * 1024, ge=65536)

    @property
    def dead_after(self) -> float | None:
        """Longest silence before a waiting request's gateway is declared unreachable."""
        return self.alive_interval * (self.alive_count_max + 1) if self.alive_interval \
            else None


class FleetSettings(_Model):
    # Worker threads, each pool bounded: requests to gateways in flight for commands
    # (fan-out), status polls in flight, and streamed API commands running at once.
    parallelism: int = Field(default=64, ge=1, le=1024)
    poll_parallelism: int = Field(default=16, ge=1, le=1024)
    stream_workers: int = Field(default=16, ge=1, le=1024)
    # A state change that could not be delivered (gateway down) is retried when the
    # gateway comes back, unless a newer command replaced it or it is older than this.
    pending_ttl_seconds: float = Field(default=24 * 3600, ge=0)


class ExceptionSettings(_Model):
    """How wide an exception an operator may open (admins: up to each gateway's own limit)."""

    operator_widest_prefix_v4: int = Field(default=24, ge=1, le=32)
    operator_widest_prefix_v6: int = Field(default=48, ge=1, le=128)


class ConfirmSettings(_Model):
    """Commit-confirmed for the controller's own commands: each is sent with this
    deadline (seconds) and confirmed by the controller as soon as the gateway's answer
    arrives over the same session, so a change that cuts the controller off is rolled
    back by the agent. Unset: final at once (as before)."""

    isolate: int | None = Field(default=None, ge=5, le=86400)
    restore: int | None = Field(default=None, ge=5, le=86400)
    allow: int | None = Field(default=None, ge=5, le=86400)


class PollSettings(_Model):
    enabled: bool = True
    interval_seconds: float = Field(default=15.0, gt=0, le=86400)
    # how long one gateway's status may take (a dead link is found sooner: ssh.alive_*)
    timeout_seconds: float = Field(default=30.0, gt=0, le=3600)


class AuditSettings(_Model):
    # A signed checkpoint of the chain's head is sent to every gateway's journal this
    # often (and after every isolate and restore); 0: only after isolate and restore.
    checkpoint_interval_seconds: float = Field(default=900.0, ge=0, le=7 * 86400)
    # The Ed25519 key that signs checkpoints (created on first start, 0600); never in
    # the database. Default: <state_dir>/checkpoint.key
    checkpoint_key_file: Path | None = None
    # Refused requests: the first per source (address, and user if known) and window
    # is recorded at once, the rest of the window as one summary with a count.
    refusal_window_seconds: float = Field(default=60.0, gt=0, le=86400)
    refusal_max_sources: int = Field(default=1000, ge=1, le=1_000_000)


class PlanSettings(_Model):
    # Two-person rule for every stage that fully restores (restore = true), whatever
    # the plan file says: a second admin approves it before it applies.
    require_approval_for_restore: bool = False
    # How often the plan driver looks at running plans.
    interval_seconds: float = Field(default=2.0, gt=0, le=3600)
    # A stage's probes are asked every probe_interval_seconds until they all pass; a
    # stage whose probes have not passed within its probe_timeout (default below) fails.
    probe_interval_seconds: float = Field(default=5.0, gt=0, le=3600)
    probe_timeout_seconds: float = Field(default=300.0, gt=0, le=7 * 86400)


class ReplicaSettings(_Model):
    """Several controllers on one PostgreSQL database (controller/replicas.py)."""

    # None: on with PostgreSQL, off with SQLite (which holds one controller only).
    # false on PostgreSQL: this controller alone uses the database (as before replicas).
    enabled: bool | None = None
    # A gateway's lease: held by one replica, renewed every renew_interval_seconds,
    # taken over by another replica once it is lease_ttl_seconds old. A killed
    # replica's gateways are taken over within lease_ttl + renew_interval seconds.
    lease_ttl_seconds: float = Field(default=6.0, gt=0, le=3600)
    renew_interval_seconds: float = Field(default=2.0, gt=0, le=600)
    # How often an idle replica looks for queued commands of its gateways and for the
    # results of commands it accepted (it is also woken at once when it queues one)
    queue_poll_seconds: float = Field(default=0.1, gt=0, le=60)

    @model_validator(mode="after")
    def _renew_before_expiry(self) -> ReplicaSettings:
        if self.renew_interval_seconds * 2 > self.lease_ttl_seconds:
            raise ValueError(f"renew_interval_seconds ({self.renew_interval_seconds:g}) must "
                             f"be at most half of lease_ttl_seconds "
                             f"({self.lease_ttl_seconds:g}): a lease must survive a late renewal")
        return self


class ApiSettings(_Model):
    listen: str = "127.0.0.1:8630"
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    metrics_require_token: bool = False
    # HTTPS: uvicorn serves TLS itself with these (PEM files; both or neither)
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> ApiSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together (give both, or neither)")
        return self

    @property
    def host(self) -> str:
        return parse_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_listen(self.listen)[1]


REPLICA_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class ControllerConfig(_Model):
    state_dir: Path = DEFAULT_STATE_DIR
    # This controller's name among replicas (default: made on first start and kept in
    # <state_dir>/controller.id); unique per process, not per host
    replica_id: str | None = Field(default=None, pattern=REPLICA_ID_RE)
    database_url: str = ""  # default: sqlite:///<state_dir>/controller.db
    audit_key_file: Path | None = None  # default: <state_dir>/audit.key
    api: ApiSettings = ApiSettings()
    ssh: SshSettings = SshSettings()
    fleet: FleetSettings = FleetSettings()
    poll: PollSettings = PollSettings()
    exceptions: ExceptionSettings = ExceptionSettings()
    confirm: ConfirmSettings = ConfirmSettings()
    audit: AuditSettings = AuditSettings()
    plans: PlanSettings = PlanSettings()
    replicas: ReplicaSettings = ReplicaSettings()
    log_level: str = Field(default="info", pattern=r"^(debug|info|warning|error)$")

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.state_dir / 'controller.db'}"

    @property
    def audit_key_path(self) -> Path:
        return self.audit_key_file or self.state_dir / "audit.key"

    @property
    def audit_head_path(self) -> Path:
        return self.state_dir / "audit.head"

    @property
    def checkpoint_key_path(self) -> Path:
        return self.audit.checkpoint_key_file or self.state_dir / "checkpoint.key"

    @property
    def instance_id_path(self) -> Path:
        return self.state_dir / "controller.id"


def parse_config(data: dict[str, Any], source: str = "<config>") -> ControllerConfig:
    try:
        return ControllerConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load_config(path: Path | None) -> ControllerConfig:
    """`path` None: the default file if it exists, else built-in defaults."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return ControllerConfig()
        path = DEFAULT_CONFIG_PATH
    try:
        data = read_toml(path)
    except AgentConfigError as exc:  # the agent's reader, the controller's error type
        raise ConfigError(str(exc)) from None
    return parse_config(data, str(path))
