"""The current shape of the controller's tables, as queries use it.

Migration steps (controller/migrations.py) are frozen snapshots of the schema at
their version; `Schema` here is the current shape. A unit test checks that a freshly
migrated database has exactly the columns `Schema` declares.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class Schema:
    """The current tables (built per instance: no module-level registry)."""

    def __init__(self) -> None:
        self.metadata = sa.MetaData()
        m = self.metadata
        self.schema_version = sa.Table(
            "schema_version", m,
            sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("description", sa.Text, nullable=False),
            sa.Column("applied_at", sa.Float, nullable=False),
        )
        self.gateways = sa.Table(
            "gateways", m,
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
        self.api_tokens = sa.Table(
            "api_tokens", m,
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
        self.audit_log = sa.Table(
            "audit_log", m,
            sa.Column("seq", BigInt, primary_key=True, autoincrement=False),
            sa.Column("ts_us", BigInt, nullable=False, index=True),
            sa.Column("actor", sa.String(128), nullable=False, index=True),
            sa.Column("action", sa.String(64), nullable=False, index=True),
            sa.Column("outcome", sa.String(32), nullable=False),
            sa.Column("targets", sa.Text, nullable=False),
            sa.Column("reason", sa.Text, nullable=False),
            sa.Column("ticket", sa.String(64)),
            sa.Column("command_id", sa.String(64), index=True),
            sa.Column("detail", sa.Text, nullable=False),
            sa.Column("prev_hash", sa.String(64), nullable=False),
            sa.Column("hash", sa.String(64), nullable=False),
        )
        self.gateway_state = sa.Table(
            "gateway_state", m,
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
            sa.Column("row_version", BigInt, nullable=False, server_default="0"),
            sa.Column("agent_version", sa.String(64)),
            sa.Column("config_digest", sa.String(32)),
            sa.Column("profiles", sa.Text),
        )
        self.audit_checkpoints = sa.Table(
            "audit_checkpoints", m,
            sa.Column("seq", BigInt, primary_key=True, autoincrement=False),
            *_checkpoint_columns(),
        )
        self.plans = sa.Table(
            "plans", m,
            sa.Column("plan_id", sa.String(32), primary_key=True),
            *_plan_columns(),
        )
        self.replicas = sa.Table("replicas", m, *_replica_columns())
        self.gateway_leases = sa.Table("gateway_leases", m, *_lease_columns())
        self.commands = sa.Table(
            "commands", m, *_command_columns(),
            sa.Index("ix_commands_gateway_seq", "gateway", "seq"),
            sa.Index("ix_commands_command_id", "command_id"),
            sa.Index("ix_commands_state", "state"),
            sa.Index("ix_commands_reported", "reported"),
        )


def _checkpoint_columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("head_hash", sa.String(64), nullable=False),
        sa.Column("ts_us", BigInt, nullable=False),
        sa.Column("signature", sa.Text, nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("public_key", sa.Text, nullable=False),
        sa.Column("anchored", sa.Text, nullable=False),  # JSON {gateway: "recorded" | why not}
    ]


def _plan_columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("doc", sa.Text, nullable=False),  # JSON: controller.plan_machine.PlanDoc
        # Who drives the plan now (controller instance id) and until when: claimed with
        # SELECT ... FOR UPDATE SKIP LOCKED, so two controllers never drive one plan.
        sa.Column("lease_owner", sa.String(64)),
        sa.Column("lease_until", sa.Float),
        sa.Column("row_version", BigInt, nullable=False, server_default="0"),
    ]


def _replica_columns() -> list[sa.Column[Any]]:
    # Live controllers sharing the database: a heartbeat renewed with their leases.
    return [
        sa.Column("replica_id", sa.String(64), primary_key=True),
        sa.Column("incarnation", sa.String(32), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("api", sa.String(255), nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("heartbeat_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    ]


def _lease_columns() -> list[sa.Column[Any]]:
    # Which replica holds which gateway, until when (the database's clock); `epoch` is
    # bumped whenever the lease changes hands (a fencing token for queued commands).
    return [
        sa.Column("gateway", sa.String(63), primary_key=True),
        sa.Column("owner", sa.String(64)),
        sa.Column("incarnation", sa.String(32)),
        sa.Column("epoch", BigInt, nullable=False, server_default="0"),
        sa.Column("expires_at", sa.Float, nullable=False, server_default="0"),
        sa.Column("acquired_at", sa.Float),
    ]


def _command_columns() -> list[sa.Column[Any]]:
    # One row per command and gateway, in the order accepted (`seq`): what the replica
    # holding the gateway's lease carries out, and where the accepting replica finds
    # the result. state: queued -> claimed -> done.
    return [
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
    ]

