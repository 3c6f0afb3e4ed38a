"""The inventory: which gateways exist, how to reach them, which host key each must show."""

from __future__ import annotations

import ipaddress
import json
import re
import time
from pathlib import Path
from typing import Annotated

import sqlalchemy as sa
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from agent.config import HOSTNAME_RE, Name
from controller.db import Database
from controller.errors import Conflict, InputError, NotFound

FINGERPRINT_RE = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")
SSH_USER_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
DEFAULT_SSH_PORT = 22


def check_fingerprint(value: str | None) -> str | None:
    if value is not None and not FINGERPRINT_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not an SSH host key fingerprint like SHA256:<43 chars> "
                         "(run 'ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub' on the "
                         "gateway)")
    return value


def check_ssh_user(value: str) -> str:
    if not SSH_USER_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid login name")
    return value


Fingerprint = Annotated[str | None, AfterValidator(check_fingerprint)]
SshUser = Annotated[str, AfterValidator(check_ssh_user)]


def parse_address(text: str) -> tuple[str, int]:
    """'10.0.0.1', '10.0.0.1:2222', 'gw.example.net:22', '[fd00::1]:22' or 'fd00::1'."""
    text = text.strip()
    host, port = text, DEFAULT_SSH_PORT
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise InputError(f"{text!r}: missing ']' after the IPv6 address")
        host, rest = text[1:close], text[close + 1:]
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise InputError(f"{text!r} is not [IPv6]:PORT")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not port_text.isdigit():
            raise InputError(f"{text!r}: the port must be a number")
        port = int(port_text)
    if not 1 <= port <= 65535:
        raise InputError(f"{text!r}: port {port} is outside 1-65535")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        if not HOSTNAME_RE.fullmatch(host):
            raise InputError(f"{text!r} is neither an IP address nor a host name") from None
    return host, port


def format_address(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port == DEFAULT_SSH_PORT else f"{shown}:{port}"


class Gateway(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Name
    host: str
    port: int = Field(default=DEFAULT_SSH_PORT, ge=1, le=65535)
    user: SshUser = "root"
    key_path: str
    host_key: Fingerprint = None
    trust_on_first_use: bool = False
    groups: tuple[Name, ...] = ()
    created_at: float = 0.0
    created_by: str = ""

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)


def require_absolute_key(name: str, key_path: str) -> None:
    """The key is read by the controller service, on its host: a path relative to some
    shell's directory would mean nothing there."""
    if not Path(key_path).is_absolute():
        raise InputError(f"{name}: --key must be an absolute path on the controller's host "
                         f"(the controller service reads it): {key_path!r}")


class Inventory:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.table = db.schema.gateways

    def add(self, gw: Gateway) -> Gateway:
        if gw.host_key is None and not gw.trust_on_first_use:
            raise InputError(f"{gw.name}: give the gateway's host key fingerprint "
                             "(--host-key SHA256:...) or ask for trust-on-first-use explicitly")
        require_absolute_key(gw.name, gw.key_path)
        t = self.table
        with self.db.begin() as conn:
            if conn.execute(sa.select(t.c.name).where(t.c.name == gw.name)).first():
                raise Conflict(f"gateway {gw.name!r} is already in the inventory")
            same = conn.execute(sa.select(t.c.name).where(t.c.host == gw.host,
                                                          t.c.port == gw.port)).first()
            if same:
                raise Conflict(f"{gw.address} is already in the inventory as {same.name!r}")
            conn.execute(t.insert().values(
                name=gw.name, host=gw.host, port=gw.port, user=gw.user, key_path=gw.key_path,
                host_key=gw.host_key, trust_on_first_use=gw.trust_on_first_use,
                groups=json.dumps(list(gw.groups)), created_at=gw.created_at or time.time(),
                created_by=gw.created_by,
            ))
        return self.get(gw.name)

    def get(self, name: str) -> Gateway:
        t = self.table
        with self.db.begin() as conn:
            row = conn.execute(sa.select(t).where(t.c.name == name)).first()
        if row is None:
            raise NotFound(f"no gateway called {name!r} in the inventory")
        return _gateway(row._asdict())

    def all(self) -> list[Gateway]:
        t = self.table
        with self.db.begin() as conn:
            rows = conn.execute(sa.select(t)).fetchall()
        # sorted here, not by the database: PostgreSQL's collation (e.g. en_US) would
        # order names differently from SQLite's bytewise one
        return sorted((_gateway(r._asdict()) for r in rows), key=lambda g: g.name)

    def remove(self, name: str) -> Gateway:
        gw = self.get(name)
        with self.db.begin() as conn:
            conn.execute(self.table.delete().where(self.table.c.name == name))
        return gw

    def update(self, name: str, **changes: object) -> tuple[Gateway, Gateway]:
        """Change some fields of a gateway (validated as a whole); (before, after)."""
        t = self.table
        with self.db.begin() as conn:
            row = conn.execute(sa.select(t).where(t.c.name == name).with_for_update()).first()
            if row is None:
                raise NotFound(f"no gateway called {name!r} in the inventory")
            before = _gateway(row._asdict())
            after = Gateway.model_validate({**before.model_dump(), **changes})
            require_absolute_key(name, after.key_path)
            if (after.host, after.port) != (before.host, before.port):
                same = conn.execute(sa.select(t.c.name).where(
                    t.c.host == after.host, t.c.port == after.port, t.c.name != name)).first()
                if same:
                    raise Conflict(f"{after.address} is already in the inventory as "
                                   f"{same.name!r}")
            conn.execute(t.update().where(t.c.name == name).values(
                host=after.host, port=after.port, user=after.user, key_path=after.key_path,
                host_key=after.host_key, trust_on_first_use=after.trust_on_first_use))
        return before, after

    def pin_host_key(self, name: str, fingerprint: str) -> None:
        """Trust-on-first-use: record the key seen first; later connections must match."""
        check_fingerprint(fingerprint)
        t = self.table
        with self.db.begin() as conn:
            conn.execute(t.update().where(t.c.name == name, t.c.host_key.is_(None))
                         .values(host_key=fingerprint))

    def select(self, *, names: tuple[str, ...] = (), groups: tuple[str, ...] = (),
               all_gateways: bool = False) -> list[Gateway]:
        """The gateways a command is for; an unknown name or an empty group is an error
        (a typo must never shrink an isolation silently)."""
        every = self.all()
        if all_gateways:
            if names or groups:
                raise InputError("--all cannot be combined with names or groups")
            if not every:
                raise InputError("the inventory is empty: add gateways first")
            return every
        if not names and not groups:
            raise InputError("say which gateways: names, --group G or --all")
        by_name = {g.name: g for g in every}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise NotFound(f"not in the inventory: {', '.join(unknown)}")
        chosen = {n: by_name[n] for n in names}
        for group in groups:
            members = [g for g in every if group in g.groups]
            if not members:
                raise NotFound(f"no gateway is in group {group!r}")
            chosen.update({g.name: g for g in members})
        return sorted(chosen.values(), key=lambda g: g.name)


def _gateway(row: dict[str, object]) -> Gateway:
    groups = json.loads(str(row.pop("groups") or "[]"))
    return Gateway.model_validate({**row, "groups": tuple(groups)})
