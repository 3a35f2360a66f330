"""The store's engine and schema: SQLite gets WAL, a 30 s busy timeout and foreign keys on every
connection, and write transactions that take the write lock at BEGIN; the schema is brought to
the newest Alembic revision shipped in `migrations/` whenever a store opens."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
BUSY_TIMEOUT_MS = 30_000
WRITE = "agentmem_write"  # execution option: this engine's transactions write
# Any fixed key: PostgreSQL's advisory lock serializes two processes migrating one database.
_MIGRATION_LOCK = 0x6167656E746D656D


def sqlite_pragmas(dbapi_connection, connection_record) -> None:
    # Let SQLAlchemy's begin event issue BEGIN (pysqlite's own implicit BEGIN comes late and
    # breaks transactional DDL); see the "begin" listener below.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=FULL")  # a committed row survives power loss too
    finally:
        cursor.close()


def sqlite_begin(conn) -> None:
    # A write transaction that read first and upgraded later could fail at once with
    # SQLITE_BUSY_SNAPSHOT under WAL; BEGIN IMMEDIATE waits (busy_timeout) for the lock instead.
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE) else "BEGIN")


def make_engines(url: str) -> tuple[Engine, Engine]:
    """(read engine, write engine) sharing one pool."""
    engine = create_engine(url, pool_pre_ping=not url.startswith("sqlite"))
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", sqlite_pragmas)
        event.listen(engine, "begin", sqlite_begin)
    return engine, engine.execution_options(**{WRITE: True})


def upgrade(write_engine: Engine) -> None:
    """Bring the schema to the newest revision, in one transaction."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    with write_engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def head() -> str:
    """The newest revision shipped."""
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    return ScriptDirectory.from_config(config).get_current_head()
