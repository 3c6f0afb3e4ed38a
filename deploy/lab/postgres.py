"""A throwaway PostgreSQL server for tests and benchmarks: Debian's binaries, a fresh
cluster in a temp dir, stopped and removed at the end.

PostgreSQL refuses to run as root, and CI runs as root: the cluster then belongs to
the `postgres` system user (Debian's package creates it; we create `drawbridge-pg` if
it is missing), and the temp dir is handed to that user. The server listens on a
unix socket in the temp dir (reachable from every network namespace of the lab, since
the file system is shared) and on 127.0.0.1 at a free port. Durability is switched
off (fsync, synchronous_commit): the data lives as long as one test run.

    with PostgresServer.start() as pg:
        url = pg.create_database("t1")      # postgresql+psycopg://...
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

SUPERUSER = "drawbridge"
FALLBACK_OS_USER = "drawbridge-pg"
DB_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class PostgresUnavailable(RuntimeError):
    """This machine cannot run a throwaway server (no binaries, no usable user)."""


def find_bindir() -> Path:
    """The newest /usr/lib/postgresql/*/bin with initdb, or pg_config's bindir."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(Path(p).parent.parent.name)
                        if Path(p).parent.parent.name.isdigit() else 0)
    if candidates:
        return Path(candidates[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise PostgresUnavailable("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/"
                              "initdb); on Debian: apt-get install postgresql")


def unavailable_reason() -> str | None:
    try:
        find_bindir()
    except PostgresUnavailable as exc:
        return str(exc)
    return None


def _os_user() -> pwd.struct_passwd:
    """Who runs the server: ourselves, unless we are root (postgres refuses root)."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    for name in ("postgres", FALLBACK_OS_USER):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    FALLBACK_OS_USER], check=True, capture_output=True)
    return pwd.getpwnam(FALLBACK_OS_USER)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresServer:
    root: Path
    port: int
    bindir: Path
    user: pwd.struct_passwd

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL over the unix socket (works from any network namespace)."""
        return (f"postgresql+psycopg://{SUPERUSER}@/{database}"
                f"?host={self.socket_dir}&port={self.port}")

    def tcp_url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    # -- lifecycle --------------------------------------------------------------------------

    @classmethod
    def start(cls, *, max_connections: int = 300) -> PostgresServer:
        bindir = find_bindir()
        user = _os_user()
        root = Path(tempfile.mkdtemp(prefix="drawbridge-pg-"))
        server = cls(root=root, port=_free_port(), bindir=bindir, user=user)
        try:
            os.chown(root, user.pw_uid, user.pw_gid)
            root.chmod(0o755)  # the socket lives here: our own (root or not) clients reach it
            server._run("initdb", "-D", str(server.data_dir), "-U", SUPERUSER,
                        "--auth=trust", "--no-locale", "-E", "UTF8", "--no-sync")
            options = (f"-k {root} -p {server.port} -c listen_addresses=127.0.0.1 "
                       f"-c max_connections={max_connections} -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off "
                       "-c shared_buffers=32MB")
            server._run("pg_ctl", "-D", str(server.data_dir), "-l", str(server.log_path),
                        "-w", "-t", "60", "-o", options, "start")
        except BaseException:
            server._remove()
            raise
        return server

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")
        self._remove()

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, tool: str, *args: str) -> None:
        as_other = os.geteuid() != self.user.pw_uid
        proc = subprocess.run(
            [str(self.bindir / tool), *args], capture_output=True, text=True, timeout=120,
            user=self.user.pw_uid if as_other else None,
            group=self.user.pw_gid if as_other else None,
            extra_groups=[] if as_other else None,
            cwd=self.root, check=False,
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", "HOME": str(self.root)})
        if proc.returncode != 0:
            log = self.log_path.read_text(errors="replace")[-2000:] \
                if self.log_path.exists() else ""
            raise PostgresUnavailable(f"{tool} failed ({proc.returncode}): "
                                      f"{proc.stderr.strip()[-2000:]}\n{log}")

    # -- databases --------------------------------------------------------------------------

    def execute(self, *statements: str, database: str = "postgres") -> None:
        """Run statements outside a transaction (CREATE DATABASE needs that)."""
        import psycopg

        with psycopg.connect(host=str(self.socket_dir), port=self.port, user=SUPERUSER,
                             dbname=database, autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement.encode("utf-8"))

    def create_database(self, name: str) -> str:
        """A fresh, empty database; returns its SQLAlchemy URL."""
        if not DB_NAME_RE.fullmatch(name):
            raise ValueError(f"{name!r} is not a plain database name")
        self.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, name: str) -> None:
        if not DB_NAME_RE.fullmatch(name):
            raise ValueError(f"{name!r} is not a plain database name")
        self.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.contextmanager
def running() -> Iterator[PostgresServer]:
    server = PostgresServer.start()
    try:
        yield server
    finally:
        server.stop()
