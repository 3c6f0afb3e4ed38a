"""sshd configuration for lab gateways (an sshd per gateway namespace, own config)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")


def listen_address(addr: str, port: int) -> str:
    """``ListenAddress`` value: ``1.2.3.4:22`` or ``[fd99::64]:22``."""
    ip = ipaddress.ip_address(addr)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def render_sshd_config(
    *,
    listen_addr: str,
    port: int,
    host_key_path: Path,
    authorized_keys_path: Path,
    workdir: Path,
    include_dir: Path | None = None,
) -> str:
    """A self-contained sshd_config: key-only root login, nothing read from /etc/ssh.

    ``include_dir``: drop-ins (``*.conf``) read first, as Debian's sshd_config does
    with /etc/ssh/sshd_config.d, so that they win (sshd keeps the first value).
    """
    lines = [f"Include {include_dir.resolve()}/*.conf"] if include_dir is not None else []
    lines += [
        f"ListenAddress {listen_address(listen_addr, port)}",
        f"HostKey {host_key_path.resolve()}",
        f"AuthorizedKeysFile {authorized_keys_path.resolve()}",
        f"PidFile {(workdir / 'sshd.pid').resolve()}",
        "StrictModes no",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "UsePAM no",
        "PermitRootLogin prohibit-password",
        "UseDNS no",
        "PrintMotd no",
        "LogLevel VERBOSE",
        "MaxStartups 100:30:200",
        "MaxSessions 100",
        # as on a real gateway: file transfers (Ansible's copy and template) use sftp
        "Subsystem sftp internal-sftp",
    ]
    return "\n".join(lines) + "\n"
