"""The database: made by the shipped Alembic migration (at head, matching the ORM tables), SQLite
connections in WAL with a busy timeout and foreign keys, one root per database, and a package
that never imports models."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

import agentmem.persistence
from agentmem.persistence import StoreError
from agentmem.persistence.database import head
from agentmem.persistence.schema import Base

TABLES = {"tenants", "sessions", "messages", "segments", "session_segments", "store_info",
          "session_leases"}  # fmt: skip


def test_schema_made_by_migration_at_head(store):
    with store._engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0002"
        assert head() == "0002"
        assert set(inspect(conn).get_table_names()) == TABLES | {"alembic_version"}
        # The migration and the ORM classes describe the same schema.
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []


def test_a_database_of_the_first_revision_is_migrated_when_opened(tmp_path):
    from alembic import command
    from alembic.config import Config

    from agentmem.persistence import Store
    from agentmem.persistence.database import MIGRATIONS, make_engines

    url = f"sqlite:///{tmp_path / 'old.db'}"
    _, write = make_engines(url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with write.begin() as connection:  # a store made before session leases existed
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
    with Store(url, tmp_path / "root") as store:
        with store._engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0002"
        assert store.acquire_lease("s", "server-1") is not None  # the new table is there


def test_sqlite_connections_use_wal_busy_timeout_and_foreign_keys(store, backend):
    if backend != "sqlite":
        assert store._engine.dialect.name == "postgresql"
        return
    for _ in range(2):  # every pooled connection, not only the first
        with store._engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    assert (store.root / "store.db").is_file()


def test_foreign_keys_enforced(store):
    with pytest.raises(Exception, match="(?i)foreign key"):
        with store._write.begin() as s:
            s.execute(
                text(
                    "INSERT INTO session_segments (session_pk, seq, segment_id)"
                    " VALUES (999, 0, 999)"
                )
            )


def test_one_root_per_database(store, open_store, tmp_path):
    other_root = tmp_path / "other"
    other_root.mkdir()
    with pytest.raises(StoreError, match="another database"):
        open_store(url=f"sqlite:///{other_root / 'db.sqlite'}", root=store.root)
    reopened = open_store()  # the right database still opens its root
    assert reopened.sessions(tenant="acme") == []


def test_migrations_ship_in_the_package():
    folder = Path(agentmem.persistence.__file__).parent / "migrations"
    assert (folder / "env.py").is_file() and (folder / "versions" / "0001_initial.py").is_file()


FORBIDDEN = (
    "agentmem.hf",
    "agentmem.memory",
    "agentmem_kernels",
    "transformers",
    "agentmem.session",
)


def test_persistence_imports_no_model_code():
    root = Path(agentmem.persistence.__file__).parent
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert not name.startswith(FORBIDDEN), f"{path} imports {name}"
                if name.startswith("agentmem.") or name == "agentmem":
                    assert name.startswith(("agentmem.persistence", "agentmem.paths")), name
