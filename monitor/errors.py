"""The daemon's exceptions, all derived from :class:`PoisonwatchError`.

``detectors`` raises plain ``ValueError`` for invalid arguments, as numerical
libraries do, and ``storage`` reports schema state as values, so the one root
lives here, where the daemon turns both into these errors.
"""

from __future__ import annotations


class PoisonwatchError(Exception):
    """Root of every error poisonwatch raises on purpose."""


class ConfigError(PoisonwatchError):
    """The configuration file or an environment override is invalid."""


class ServerStartError(PoisonwatchError):
    """The HTTP server could not listen on the configured address, usually because the port is in use."""


class LoaderError(PoisonwatchError):
    """A model loader could not be found, or returned something unusable."""


class DatabaseNotMigratedError(PoisonwatchError):
    """The database schema is not at the revision this version of poisonwatch needs."""

    def __init__(self, current: str | None, expected: str, *, location: str | None = None) -> None:
        self.current = current
        self.expected = expected
        self.location = location
        if location is not None:
            message = (
                f"database file {location} not found (relative SQLite paths are relative to the current directory):"
                " check that --config names your configuration and that you run from its directory;"
                " for a new database, run 'poisonwatch db upgrade --config FILE' first"
            )
        else:
            message = (
                f"database schema is at revision {current or 'none (empty database)'}, expected {expected}:"
                " run 'poisonwatch db upgrade --config FILE' first"
            )
        super().__init__(message)


class UnknownModelError(PoisonwatchError):
    """A request named a model that is not in the configuration."""

    def __init__(self, model: str) -> None:
        self.model = model
        super().__init__(f"model {model!r} not found; configured models are listed in the config's [[models]] tables")


class SchedulerLockedError(PoisonwatchError):
    """Another process already runs the scheduler on this SQLite database."""

    def __init__(self, holder: str) -> None:
        self.holder = holder
        super().__init__(
            f"another poisonwatch scheduler already runs on this database, held by {holder}; "
            "SQLite supports one scheduler per database: stop it, set [scheduler] enabled = false "
            "on this process, or use PostgreSQL for several replicas"
        )


class AuthenticationConfigError(ConfigError):
    """The API binds to a non-loopback address but no bearer token is configured."""

    def __init__(self, host: str) -> None:
        self.host = host
        super().__init__(
            f"[server] host = {host!r} is not a loopback address, so writes need a bearer token, "
            "but [server] token_sha256 is empty: run 'poisonwatch token create' and add the printed digest"
        )
