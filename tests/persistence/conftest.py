"""Every store test runs on SQLite and on a real PostgreSQL server: a throwaway cluster started
once per test run (as the `postgres` user when the tests run as root), a fresh database per test."""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from agentmem.persistence import Store
from agentmem.testing import free_port

INSTALL = "install Debian's `postgresql` package (apt-get install -y postgresql)"


def pg_bindir() -> Path:
    """The directory of initdb/pg_ctl, or a test failure saying what to install."""
    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        if out.returncode == 0:
            candidates.append(Path(out.stdout.strip()))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    pytest.fail(f"PostgreSQL server binaries (initdb, pg_ctl) not found: {INSTALL}")


class PostgresServer:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with trust auth."""

    def __init__(self) -> None:
        self.bindir = pg_bindir()
        self.base = Path(tempfile.mkdtemp(prefix="agentmem-pg-"))
        self.data, self.sockets = self.base / "data", self.base / "sockets"
        self.sockets.mkdir()
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail(f"no `postgres` user to run the server as: {INSTALL}")
            for path in (self.base, self.sockets):
                os.chown(path, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.port = free_port()
        self.log = self.base / "server.log"
        self.run("initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
                 "--no-sync", "--no-instructions")  # fmt: skip
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sockets} -c fsync=off "
            "-c full_page_writes=off -c synchronous_commit=off -c max_connections=200"
        )
        self.run("pg_ctl", "-D", self.data, "-l", self.log, "-o", options, "-w", "start")
        self.counter = itertools.count()

    def run(self, tool: str, *args: object) -> None:
        command = [*self.as_user, str(self.bindir / tool), *map(str, args)]
        out = subprocess.run(command, capture_output=True, text=True, cwd=self.base)
        if out.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            pytest.fail(f"{tool} failed ({out.returncode}): {out.stdout}{out.stderr}{log}")

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        import psycopg

        name = f"test_{next(self.counter)}"
        with psycopg.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        try:
            self.run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def store_args(backend, tmp_path, request) -> dict:
    """`Store(**store_args)`: a fresh database and root for this test."""
    url = None
    if backend == "postgresql":
        url = request.getfixturevalue("postgres_server").new_database()
    return {"url": url, "root": tmp_path / "store"}


@pytest.fixture
def open_store(store_args):
    """Opens a Store on this test's database and root (again, to see what persisted)."""
    opened: list[Store] = []

    def open_(**overrides) -> Store:
        store = Store(**{**store_args, **overrides})
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store) -> Store:
    return open_store()
