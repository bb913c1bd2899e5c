"""Engine and session setup for SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, sessionmaker

# Seconds a SQLite writer waits for another writer's lock before failing.
SQLITE_BUSY_TIMEOUT_SECONDS = 30
# Seconds a new PostgreSQL connection may take; an unreachable server then
# fails a request with a 503 instead of hanging it.
POSTGRES_CONNECT_TIMEOUT_SECONDS = 5


def masked_url(url: str | URL) -> str:
    """Render a database URL with its password replaced by ``***``, for logs and errors."""
    return make_url(url).render_as_string(hide_password=True)


def mask_password(message: str, url: str | URL) -> str:
    """Replace every occurrence of the password in ``url`` (raw or URL-encoded) in ``message`` with ``***``."""
    parsed = make_url(url)
    password = parsed.password
    if not password:
        return message
    for form in {str(password), quote(str(password), safe="")}:
        message = message.replace(form, "***")
    return message


def describe_database_error(error: BaseException, url: str | URL) -> str:
    """Summarise a database error in one line, for health checks and logs, with the password masked.

    The summary is the driver exception's class and the first line of its
    message; SQLAlchemy's own text (the statement and its parameters) is left out.
    """
    cause = getattr(error, "orig", None) or error
    first_line = (str(cause).strip().splitlines() or [""])[0][:300]
    return mask_password(f"{type(cause).__name__}: {first_line}".rstrip(": "), url)


def _configure_sqlite_connection(dbapi_connection: sqlite3.Connection, _record: object) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the API read while a job writes; NORMAL synchronous is durable
    # across process crashes in WAL mode (an OS crash may lose the last commits).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def create_db_engine(url: str, *, echo: bool = False) -> Engine:
    """Create an engine for ``url``; SQLite gets WAL mode, foreign keys and a busy timeout.

    A relative SQLite path is resolved against the current directory and its
    parent directory is created, so a fresh machine needs no set-up step.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            path = Path(database).expanduser().resolve()
            path.parent.mkdir(parents=True, exist_ok=True)
            parsed = parsed.set(database=str(path))
        engine = create_engine(
            parsed,
            echo=echo,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS, "check_same_thread": False},
        )
        event.listen(engine, "connect", _configure_sqlite_connection)
        return engine
    return create_engine(
        parsed,
        echo=echo,
        pool_pre_ping=True,
        hide_parameters=True,
        connect_args={"connect_timeout": POSTGRES_CONNECT_TIMEOUT_SECONDS},
    )


def create_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Return a session factory whose sessions keep loaded objects usable after commit."""
    return sessionmaker(engine, expire_on_commit=False)
