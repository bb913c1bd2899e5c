"""Opening the daemon's database for a command, with the schema check every entry point needs.

Nothing here imports JAX, so the CLI and API workers can check the schema
without loading a model.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, make_url

from monitor.errors import DatabaseNotMigratedError
from storage import migrations
from storage.db import create_db_engine


def check_schema(engine: Engine) -> None:
    """Raise :class:`DatabaseNotMigratedError` unless the database is at the newest revision."""
    current = migrations.current_revision(engine)
    expected = migrations.head_revision()
    if current != expected:
        raise DatabaseNotMigratedError(current, expected)


def open_migrated(url: str) -> Engine:
    """Create an engine for an existing, migrated database; the caller disposes of it.

    A SQLite file that does not exist raises :class:`DatabaseNotMigratedError`
    before anything creates it, so a mistyped path leaves no empty file behind.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        if not Path(parsed.database).expanduser().exists():
            raise DatabaseNotMigratedError(None, migrations.head_revision(), location=parsed.database)
    engine = create_db_engine(url)
    try:
        check_schema(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine
