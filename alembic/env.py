"""Alembic environment for poisonwatch: online migrations in SQLite batch mode."""

from __future__ import annotations

import os

from alembic import context

from storage.db import create_db_engine
from storage.models import Base

target_metadata = Base.metadata


def database_url() -> str:
    # The alembic command line reads alembic.ini, whose URL the environment may
    # override; poisonwatch's own calls pass the URL in a config without a file.
    if context.config.config_file_name is not None and os.environ.get("POISONWATCH_DATABASE_URL"):
        return os.environ["POISONWATCH_DATABASE_URL"]
    return context.config.get_main_option("sqlalchemy.url")


def run_migrations_offline() -> None:
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run_with(connection)
        return
    engine = create_db_engine(database_url())
    with engine.connect() as connection:
        _run_with(connection)
    engine.dispose()


def _run_with(connection) -> None:
    # Batch mode copies and recreates tables on SQLite, which cannot ALTER
    # most constraints in place; on PostgreSQL it emits plain ALTER statements.
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
