"""Alembic migrations driven from Python: upgrade, downgrade and schema checks."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

# The migration scripts live in alembic/ at the top of the checkout. They are
# not a package: an importable "alembic" would shadow the library.
SCRIPT_LOCATION = Path(__file__).resolve().parent.parent / "alembic"


def alembic_config(url: str) -> Config:
    """Build an Alembic config for ``url`` without reading an ini file."""
    if not SCRIPT_LOCATION.is_dir():
        raise FileNotFoundError(
            f"migration scripts not found at {SCRIPT_LOCATION}; install poisonwatch from a checkout "
            "with 'pip install -e .'"
        )
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    # ConfigParser interpolation would treat a '%' in a password as a reference.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` up to ``revision``."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Migrate the database at ``url`` down to ``revision`` (``"base"`` drops every table)."""
    command.downgrade(alembic_config(url), revision)


def head_revision() -> str:
    """Return the newest revision among the migration scripts."""
    script = ScriptDirectory(str(SCRIPT_LOCATION))
    head = script.get_current_head()
    if head is None:
        raise RuntimeError(f"no migration scripts found in {SCRIPT_LOCATION}")
    return head


def current_revision(engine: Engine) -> str | None:
    """Return the revision the database is at, or None for an un-migrated database."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
