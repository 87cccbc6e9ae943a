"""A real PostgreSQL server for tests: ``initdb`` in a temporary directory, listening on 127.0.0.1:<free port> (its
unix socket in that directory too), stopped (``pg_ctl stop -m fast``) and removed at the end.

Fixtures (registered in ``tests/conftest.py``):

- ``postgres``: the session's server (one per xdist worker);
- ``pg_url``: a fresh database on it for each test (``CREATE DATABASE`` with a unique name), as a
  ``postgresql://postgres@127.0.0.1:PORT/NAME`` URL: tests do not see each other's rows;
- ``store_url``: parametrized over both backends: a SQLite file, then a fresh PostgreSQL database.

PostgreSQL missing makes the fixtures fail, not skip: CI installs it (Debian's ``postgresql``). As root (CI, the
dev machines) the server runs as the ``postgres`` OS user, which ``initdb`` and ``postgres`` require.

Authentication (``pg_hba.conf``): local socket and TCP connections are trusted, except TCP ones of the role
``PASSWORD_ROLE``, which need its password (``scram-sha-256``): the test of ``results_db_password_env`` uses it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shlex
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.devstack.supervisor import free_port

PASSWORD_ROLE = "gw_secret"
HBA = f"""\
local all all trust
host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256
host all all 127.0.0.1/32 trust
"""


def pg_bin(name: str) -> str:
    """``initdb``, ``pg_ctl``: from PATH, else the newest /usr/lib/postgresql/*/bin (Debian keeps them there)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    if not candidates:
        pytest.fail(f"PostgreSQL is not installed ({name} not on PATH nor in /usr/lib/postgresql/*/bin): "
                    "apt-get install postgresql")  # fmt: skip
    return candidates[-1]


class PostgresServer:
    """One PostgreSQL server in a temporary directory (see the module's docstring)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="gateway-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.as_root = os.geteuid() == 0

    def setup(self) -> None:
        if self.as_root:
            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.root.chmod(0o700)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        (self.data / "pg_hba.conf").write_text(HBA)
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        command = [pg_bin(tool), *args]
        if self.as_root:
            runuser = shutil.which("runuser")
            command = (
                [runuser, "-u", "postgres", "--", *command]
                if runuser
                else ["su", "postgres", "-c", shlex.join(command)]
            )
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=self.root)
        if done.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(
                f"{tool} {' '.join(args)} failed ({done.returncode}): {done.stderr}{done.stdout}\n{tail}"
            )

    def start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options, "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def admin(self, database: str = "postgres") -> Any:
        """A superuser's autocommit connection (over TCP, trusted)."""
        import psycopg

        return psycopg.connect(self.url(database), autocommit=True)

    def create_database(self) -> str:
        """A new empty database; its URL."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        with self.admin() as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.setup()
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    return postgres.create_database()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "results.sqlite")
    url: str = request.getfixturevalue("pg_url")
    return url
