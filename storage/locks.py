"""The scheduler lock: at most one process per database runs the scheduled jobs.

On PostgreSQL the lock is a session-level advisory lock held on a dedicated
connection. The server releases it when that connection ends, including when
the holding process is killed, so a standby replica can take over. On SQLite
it is an exclusive ``flock`` on a file beside the database; the kernel
releases it when the process exits.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import Protocol

from sqlalchemy import Connection, Engine, create_engine, make_url, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from storage.db import POSTGRES_CONNECT_TIMEOUT_SECONDS, describe_database_error

logger = logging.getLogger(__name__)

# The advisory lock key, 64-bit signed: the ASCII bytes of "poisonwa".
# Any other application using the same key on the same database would contend with it.
SCHEDULER_LOCK_KEY = int.from_bytes(b"poisonwa", "big", signed=True)


class SchedulerLock(Protocol):
    """A lock that one process holds while it runs the scheduler."""

    def try_acquire(self) -> bool:
        """Take the lock without waiting; True when this process now holds it."""

    def is_held(self) -> bool:
        """Check that the lock is still held; False when it was lost (for example, the connection died)."""

    def release(self) -> None:
        """Give the lock up; does nothing when it is not held."""

    def holder(self) -> str:
        """Describe who holds the lock, for error messages."""


class PostgresAdvisoryLock:
    """``pg_try_advisory_lock`` on a dedicated autocommit connection outside the pool."""

    def __init__(self, url: str, key: int = SCHEDULER_LOCK_KEY) -> None:
        self._url = url
        self._key = key
        self._engine: Engine = create_engine(
            make_url(url),
            poolclass=NullPool,
            isolation_level="AUTOCOMMIT",
            connect_args={"connect_timeout": POSTGRES_CONNECT_TIMEOUT_SECONDS},
        )
        self._connection: Connection | None = None

    def try_acquire(self) -> bool:
        if self._connection is not None:
            return True
        try:
            connection = self._engine.connect()
        except DBAPIError as error:
            logger.warning("cannot reach the database to take the scheduler lock: %s", describe_database_error(error, self._url))
            return False
        try:
            acquired = bool(connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": self._key}))
        except DBAPIError as error:
            logger.warning("taking the scheduler lock failed: %s", describe_database_error(error, self._url))
            connection.close()
            return False
        if not acquired:
            connection.close()
            return False
        self._connection = connection
        return True

    def is_held(self) -> bool:
        if self._connection is None:
            return False
        try:
            # The lock lives as long as the connection's server process; a
            # query that succeeds proves the session, and so the lock, survives.
            self._connection.scalar(text("SELECT 1"))
            return True
        except DBAPIError as error:
            logger.warning("lost the scheduler lock connection: %s", describe_database_error(error, self._url))
            self._discard()
            return False

    def release(self) -> None:
        if self._connection is None:
            return
        try:
            self._connection.scalar(text("SELECT pg_advisory_unlock(:key)"), {"key": self._key})
        except DBAPIError as error:
            logger.warning("releasing the scheduler lock failed: %s", describe_database_error(error, self._url))
        self._discard()

    def holder(self) -> str:
        try:
            with self._engine.connect() as connection:
                row = connection.execute(
                    text(
                        "SELECT a.pid, a.client_addr, a.application_name FROM pg_locks l "
                        "JOIN pg_stat_activity a ON a.pid = l.pid "
                        "WHERE l.locktype = 'advisory' AND l.granted "
                        "AND l.classid = (:key >> 32)::oid AND l.objid = (:key & 4294967295)::oid"
                    ),
                    {"key": self._key},
                ).first()
        except DBAPIError:
            return "unknown (the database is unreachable)"
        if row is None:
            return "nobody"
        return f"PostgreSQL backend {row.pid} (client {row.client_addr or 'local socket'})"

    def _discard(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except DBAPIError:
                # The connection is already broken; closing it only frees local state.
                connection.invalidate()

    def dispose(self) -> None:
        self.release()
        self._engine.dispose()


class SqliteFileLock:
    """An exclusive ``flock`` on ``<database>.scheduler.lock``; the file stores the holder's pid."""

    def __init__(self, database_path: Path) -> None:
        self.path = Path(f"{database_path}.scheduler.lock")
        self._file = None

    def try_acquire(self) -> bool:
        if self._file is not None:
            return True
        file = open(self.path, "a+")
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            return False
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()}\n")
        file.flush()
        self._file = file
        return True

    def is_held(self) -> bool:
        return self._file is not None

    def release(self) -> None:
        if self._file is None:
            return
        fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        self._file.close()
        self._file = None

    def holder(self) -> str:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            pid = ""
        return f"process {pid or 'unknown'} (lock file {self.path})"

    def dispose(self) -> None:
        self.release()


class NoLock:
    """For an in-memory SQLite database, which no other process can open."""

    def try_acquire(self) -> bool:
        return True

    def is_held(self) -> bool:
        return True

    def release(self) -> None:
        pass

    def holder(self) -> str:
        return "this process"

    def dispose(self) -> None:
        pass


def scheduler_lock_for(url: str) -> PostgresAdvisoryLock | SqliteFileLock | NoLock:
    """Return the scheduler lock that fits the backend of ``url``."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        return PostgresAdvisoryLock(url)
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            return NoLock()
        return SqliteFileLock(Path(parsed.database).expanduser().resolve())
    raise NotImplementedError(f"no scheduler lock for database backend {backend}; use PostgreSQL or SQLite")
