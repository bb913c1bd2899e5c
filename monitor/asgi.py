"""An ASGI application factory for serving the API from several uvicorn worker processes.

Run it as::

    PROMETHEUS_MULTIPROC_DIR=/run/poisonwatch/metrics POISONWATCH_CONFIG=poisonwatch.toml \\
        uvicorn --factory monitor.asgi:create_app --workers 4 --host 127.0.0.1 --port 8000

Each worker serves the HTTP API only: no scheduler and no models, so a worker
never initialises JAX. One separate process runs the scheduler.

prometheus_client picks its multiprocess mode when it is first imported, so
``PROMETHEUS_MULTIPROC_DIR`` must be set in the environment that starts
uvicorn. The directory must exist and be emptied before the workers start
(files left by an earlier run would be added to the new counters). Counters
and histograms are summed over every worker's files, those of dead workers
included, so replacing a worker never lowers a counter.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from monitor import api
from monitor.auth import TokenVerifier
from monitor.config import CONFIG_FILE_VARIABLE, MULTIPROCESS_DIR_VARIABLE, load_config
from monitor.database import open_migrated
from monitor.errors import ConfigError
from monitor.metrics import Metrics
from storage.db import create_session_factory

logger = logging.getLogger(__name__)

CONFIG_VARIABLE = CONFIG_FILE_VARIABLE
MULTIPROC_VARIABLE = MULTIPROCESS_DIR_VARIABLE


def multiprocess_dir() -> Path:
    """Return the directory named by ``PROMETHEUS_MULTIPROC_DIR``; raise ConfigError if unset or missing."""
    value = os.environ.get(MULTIPROC_VARIABLE)
    if not value:
        raise ConfigError(
            f"{MULTIPROC_VARIABLE} is not set; set it to an empty directory before starting uvicorn "
            "so that the workers' metrics can be summed"
        )
    path = Path(value)
    if not path.is_dir():
        raise ConfigError(f"{MULTIPROC_VARIABLE} names {path}, which is not a directory; create it before starting uvicorn")
    return path


def create_app() -> FastAPI:
    """Build one worker's API application from the config file named by ``POISONWATCH_CONFIG``.

    Without the variable the defaults apply, with the usual ``POISONWATCH_*``
    overrides. Raises :class:`~monitor.errors.PoisonwatchError` subclasses when
    the configuration is invalid or the database is not migrated.
    """
    config = load_config(os.environ.get(CONFIG_VARIABLE))
    metrics_dir = multiprocess_dir()
    engine = open_migrated(config.database.url)
    session_factory = create_session_factory(engine)
    model_names = [model.name for model in config.models]
    # The registry below contains this worker's metric objects. Their values
    # go to files in metrics_dir, and /metrics reads those files.
    metrics = Metrics(CollectorRegistry(), model_names, session_factory, multiprocess_dir=metrics_dir)
    # Workers bind to the configured host, so the same token rule applies as for serve.
    state = api.ApiState(
        config=config,
        session_factory=session_factory,
        metrics=metrics,
        auth=TokenVerifier.for_server(config.server.host, config.server.token_sha256),
    )
    logger.info("API worker %d serving %d models", os.getpid(), len(model_names))
    app = api.create_app(state)
    api.freeze_startup_objects()
    return app
