"""Alembic environment of the session store. `Store` runs it programmatically on open, passing
its connection in `config.attributes["connection"]`; with no connection it opens
`sqlalchemy.url` (the `alembic` command line, given a config that sets both)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from agentmem.persistence.schema import Base

config = context.config
target_metadata = Base.metadata


def run_migrations(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copy
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()
elif (connection := config.attributes.get("connection")) is not None:
    run_migrations(connection)
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
    with engine.begin() as connection:
        run_migrations(connection)
