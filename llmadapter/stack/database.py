"""A throwaway PostgreSQL cluster from the machine's packages: initdb, a server on a loopback port, databases.

PostgreSQL refuses to run as root, so as root the cluster belongs to `nobody` and its programs run
under `setpriv` (util-linux); its data dir then sits where `nobody` can reach it (a temp dir when the
given root is private). Only TCP on 127.0.0.1 is served (no Unix socket), with a password.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote

from llmadapter.errors import LLMAdapterError
from llmadapter.stack._service import Service, free_ports

__all__ = ["Database", "find_postgres_bindir"]

USER = "llmadapter"
_SERVICE_USER = "nobody"
# A test and demo cluster: durability off (a crash loses the cluster, which is thrown away anyway).
_FAST_SETTINGS = ("fsync=off", "full_page_writes=off", "synchronous_commit=off")


def find_postgres_bindir() -> Path:
    """The bin dir of the newest installed PostgreSQL (Debian: /usr/lib/postgresql/N/bin), else PATH's."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3].split(".")[0])
    )
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    raise LLMAdapterError(
        "PostgreSQL's initdb was not found (looked in /usr/lib/postgresql/*/bin and on PATH): "
        "install the server, e.g. `apt-get install postgresql`."
    )


def _reachable_by_others(path: Path) -> bool:
    """Whether every directory above `path` lets other users through (o+x)."""
    return all(parent.stat().st_mode & stat.S_IXOTH for parent in path.resolve().parents)


class Database:
    """One PostgreSQL cluster (user `llmadapter`, a random password) serving 127.0.0.1:`port`."""

    def __init__(
        self, root: Path, *, port: int | None = None, password: str | None = None, attached: bool = True
    ) -> None:
        self.root = Path(root)
        self.port = port if port is not None else free_ports(1)[0]
        self.password = password if password is not None else secrets.token_urlsafe(16)
        self.bindir = find_postgres_bindir()
        self._as_root = os.geteuid() == 0
        self.cluster_dir = self._pick_cluster_dir()
        self.data_dir = self.cluster_dir / "data"
        self.service = Service(
            name=f"PostgreSQL on 127.0.0.1:{self.port}",
            argv=[
                *self._as_owner(),
                str(self.bindir / "postgres"),
                "-D",
                str(self.data_dir),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",
                *(arg for setting in _FAST_SETTINGS for arg in ("-c", setting)),
            ],
            log=self.root / "postgres.log",
            ready=self.accepts_connections,
            stop_signal=signal.SIGINT,
            attached=attached,
        )

    def _pick_cluster_dir(self) -> Path:
        wanted = self.root / "postgres"
        if not self._as_root or _reachable_by_others(wanted):
            return wanted
        # The root is private (pytest's tmp dirs are 0700): the cluster goes where `nobody` can work.
        pointer = self.root / "postgres-dir"
        if pointer.is_file():
            return Path(pointer.read_text().strip())
        self.root.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix="llmadapter-postgres-"))
        pointer.write_text(str(path))
        return path

    def _as_owner(self) -> list[str]:
        """The command prefix that runs a PostgreSQL program as the cluster's owner."""
        if not self._as_root:
            return []
        entry = pwd.getpwnam(_SERVICE_USER)
        # --pdeathsig keep: the parent-death signal die_with_parent armed survives the change of user.
        return [
            "setpriv",
            f"--reuid={entry.pw_uid}",
            f"--regid={entry.pw_gid}",
            "--clear-groups",
            "--pdeathsig",
            "keep",
        ]

    def url(self, database: str, driver: str = "psycopg2") -> str:
        """A SQLAlchemy URL: driver `psycopg2` for MLflow, `asyncpg` for Prefect."""
        return (
            f"postgresql+{driver}://{USER}:{quote(self.password, safe='')}@127.0.0.1:{self.port}/{database}"
        )

    def _init_cluster(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        pwfile = self.cluster_dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._as_root:
            entry = pwd.getpwnam(_SERVICE_USER)
            for path in (self.cluster_dir, self.data_dir, pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        os.chmod(self.data_dir, 0o700)
        os.chmod(pwfile, 0o600)
        argv = [*self._as_owner(), str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", USER]
        argv += ["--pwfile", str(pwfile), "--auth=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8"]
        argv += ["--no-sync", "--no-instructions"]
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise LLMAdapterError(f"initdb failed ({result.returncode}): {result.stderr[-2000:]}")

    def start(self) -> None:
        """initdb (once) and start the server; returns at once (wait_ready waits)."""
        self._init_cluster()
        self.service.start()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        self.service.wait_ready(timeout_s)

    def accepts_connections(self) -> bool:
        pg_isready = self.bindir / "pg_isready"
        result = subprocess.run(
            [str(pg_isready), "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, "-d", "postgres"],
            capture_output=True,
        )
        return result.returncode == 0

    def create_database(self, name: str) -> None:
        """CREATE DATABASE `name` unless it exists."""
        import psycopg2

        if not name.replace("_", "").isalnum():
            raise LLMAdapterError(f"Database name {name!r}: letters, digits and '_' only.")
        conn = psycopg2.connect(
            host="127.0.0.1", port=self.port, user=USER, password=self.password, dbname="postgres"
        )
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()

    def query(self, database: str, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        """Rows of one query (what a store wrote, read without its server)."""
        import psycopg2

        conn = psycopg2.connect(
            host="127.0.0.1", port=self.port, user=USER, password=self.password, dbname=database
        )
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return list(cur.fetchall())
        finally:
            conn.close()

    def stop(self) -> None:
        self.service.stop()

    def remove(self) -> None:
        """Delete the cluster's files (after stop)."""
        shutil.rmtree(self.cluster_dir, ignore_errors=True)
