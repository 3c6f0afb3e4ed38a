"""Who this controller is among replicas: its replica id, and this process's incarnation.

The replica id comes from the config (`replica_id`) or is made on first start and
kept in `<state_dir>/controller.id`: it survives restarts, so a restarted replica is
the same one (and resumes what it held), and it is not the host name alone, since two
replicas may run on one host (each with its own state dir, or its own `replica_id`).

The incarnation is new in every process: it tells this run of a replica from the
previous one (which may have been killed with leases still on its name), and two
processes started with the same replica id by mistake from each other.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import uuid
from pathlib import Path

from controller.config import REPLICA_ID_RE, ControllerConfig
from controller.errors import ConfigError


def _generated() -> str:
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname().split(".")[0])[:40]
    return f"{host or 'controller'}-{uuid.uuid4().hex[:12]}"


def read_or_create_id(path: Path) -> str:
    """The id kept in `path`, made (atomically: O_EXCL) on first use."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        text = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if text:
        if not re.fullmatch(REPLICA_ID_RE, text):
            raise ConfigError(f"{path} does not hold a replica id (letters, digits, '.', "
                              f"'_', '-'; at most 64): {text[:80]!r}")
        return text
    value = _generated()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # made concurrently (or empty): whoever wrote first wins
        if path.stat().st_size:
            return read_or_create_id(path)
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(value + "\n")
    return value


def replica_id(config: ControllerConfig) -> str:
    """The configured replica id, else the one kept in the state dir."""
    return config.replica_id or read_or_create_id(config.instance_id_path)


def new_incarnation() -> str:
    return secrets.token_hex(8)
