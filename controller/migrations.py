"""Migrations: a small versioned list, not an alembic script directory.

Each step has a number, runs in one transaction together with the row that records
it in `schema_version` (`Database.migrate`, controller/db.py), and uses alembic's
`Operations` for portable DDL (SQLite has no real ALTER TABLE; alembic's batch mode
covers it). A packaged controller thus needs no alembic.ini or env.py on disk,
`serve` migrates on start, and a database newer than the code is refused.

Migration steps are frozen snapshots of the schema at their version; `Schema`
(controller/schema.py) is the current shape that queries use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import sqlalchemy as sa

from controller.schema import BigInt

if TYPE_CHECKING:
    from alembic.operations import Operations


def _m1_initial(op: Operations) -> None:
    op.create_table(
        "gateways",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("port", sa.Integer, nullable=False),
        sa.Column("user", sa.String(64), nullable=False),
        sa.Column("key_path", sa.Text, nullable=False),
        sa.Column("host_key", sa.String(80)),
        sa.Column("trust_on_first_use", sa.Boolean, nullable=False),
        sa.Column("groups", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("user", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False),
        sa.Column("revoked_at", sa.Float),
        sa.Column("last_used_at", sa.Float),
    )
    op.create_table(
        "audit_log",
        sa.Column("seq", BigInt, primary_key=True, autoincrement=False),
        sa.Column("ts_us", BigInt, nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("targets", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("ticket", sa.String(64)),
        sa.Column("command_id", sa.String(64)),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    for column in ("ts_us", "actor", "action", "command_id"):
        op.create_index(f"ix_audit_log_{column}", "audit_log", [column])
    op.create_table(
        "gateway_state",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("reachable", sa.Boolean),
        sa.Column("last_contact_at", sa.Float),
        sa.Column("last_error_code", sa.String(64)),
        sa.Column("last_error", sa.Text),
        sa.Column("state", sa.String(16)),
        sa.Column("profile", sa.String(63)),
        sa.Column("verification", sa.String(16)),
        sa.Column("in_sync", sa.Boolean),
        sa.Column("generation", sa.Integer),
        sa.Column("since", sa.Float),
        sa.Column("gw_actor", sa.String(128)),
        sa.Column("gw_reason", sa.Text),
        sa.Column("drift_repairs", sa.Integer),
        sa.Column("problems", sa.Text),
        sa.Column("exceptions", sa.Text),
        sa.Column("observed_at", sa.Float),
        sa.Column("pending", sa.Text),
        sa.Column("last_command_id", sa.String(64)),
        sa.Column("host_key_seen", sa.String(80)),
    )


def _m2_row_version(op: Operations) -> None:
    # Bumped by every write of a gateway's row: a status poll that read the row before
    # asking the gateway can tell, when it comes back, whether a command (or another
    # controller sharing the database) wrote newer facts meanwhile.
    op.add_column("gateway_state",
                  sa.Column("row_version", BigInt, nullable=False, server_default="0"))


def _m3_checkpoints_plans(op: Operations) -> None:
    # Signed chain heads (the key that signs them is a file, never in the database) and
    # durable restore plans, driven by the controller's scheduler.
    op.create_table(
        "audit_checkpoints",
        sa.Column("seq", BigInt, primary_key=True, autoincrement=False),
        sa.Column("head_hash", sa.String(64), nullable=False),
        sa.Column("ts_us", BigInt, nullable=False),
        sa.Column("signature", sa.Text, nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("public_key", sa.Text, nullable=False),
        sa.Column("anchored", sa.Text, nullable=False),
    )
    op.create_table(
        "plans",
        sa.Column("plan_id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("doc", sa.Text, nullable=False),
        sa.Column("lease_owner", sa.String(64)),
        sa.Column("lease_until", sa.Float),
        sa.Column("row_version", BigInt, nullable=False, server_default="0"),
    )


def _m5_replicas(op: Operations) -> None:
    # Controller replicas on one PostgreSQL database: heartbeats, gateway leases and the
    # command queue (controller/replicas.py).
    op.create_table(
        "replicas",
        sa.Column("replica_id", sa.String(64), primary_key=True),
        sa.Column("incarnation", sa.String(32), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("api", sa.String(255), nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("heartbeat_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    op.create_table(
        "gateway_leases",
        sa.Column("gateway", sa.String(63), primary_key=True),
        sa.Column("owner", sa.String(64)),
        sa.Column("incarnation", sa.String(32)),
        sa.Column("epoch", BigInt, nullable=False, server_default="0"),
        sa.Column("expires_at", sa.Float, nullable=False, server_default="0"),
        sa.Column("acquired_at", sa.Float),
    )
    op.create_table(
        "commands",
        sa.Column("seq", BigInt, primary_key=True, autoincrement=True),
        sa.Column("command_id", sa.String(64), nullable=False),
        sa.Column("gateway", sa.String(63), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("op", sa.String(32), nullable=False),
        sa.Column("args", sa.Text, nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("ticket", sa.String(64)),
        sa.Column("accepted_at", sa.Float, nullable=False),
        sa.Column("accepted_by", sa.String(64), nullable=False),
        sa.Column("accepted_incarnation", sa.String(32), nullable=False),
        sa.Column("audit", sa.String(64)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("claimed_by", sa.String(64)),
        sa.Column("claim_epoch", BigInt),
        sa.Column("claimed_at", sa.Float),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("finished_at", sa.Float),
        sa.Column("result", sa.Text),
        sa.Column("reported", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.create_index("ix_commands_gateway_seq", "commands", ["gateway", "seq"])
    op.create_index("ix_commands_command_id", "commands", ["command_id"])
    op.create_index("ix_commands_state", "commands", ["state"])
    op.create_index("ix_commands_reported", "commands", ["reported"])


def _m4_agent_facts(op: Operations) -> None:
    # What each gateway runs (agent version, config digest) and which profiles it knows:
    # an isolate naming a profile a gateway does not have is refused before anything is
    # sent to any gateway.
    for column in (sa.Column("agent_version", sa.String(64)),
                   sa.Column("config_digest", sa.String(32)),
                   sa.Column("profiles", sa.Text)):
        op.add_column("gateway_state", column)


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Operations], None]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema: gateways, api_tokens, audit_log, gateway_state", _m1_initial),
    Migration(2, "gateway_state.row_version", _m2_row_version),
    Migration(3, "audit_checkpoints; plans", _m3_checkpoints_plans),
    Migration(4, "gateway_state: agent_version, config_digest, profiles", _m4_agent_facts),
    Migration(5, "replicas, gateway_leases, commands", _m5_replicas),
)
LATEST_VERSION = MIGRATIONS[-1].version
