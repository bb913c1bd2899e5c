"""One poisonwatch process: the HTTP API and, optionally, the job scheduler."""

from __future__ import annotations

import logging
import threading
from importlib import metadata

import jax
import uvicorn
from prometheus_client import CollectorRegistry

from detectors import runtime
from monitor.api import ApiState, create_app
from monitor.auth import TokenVerifier, is_loopback
from monitor.config import Config
from monitor.database import check_schema
from monitor.errors import AuthenticationConfigError, ServerStartError
from monitor.jobs import JobContext
from monitor.metrics import Metrics
from monitor.registry import ModelRegistry
from monitor.scheduler import SchedulerLeadership
from storage.db import create_db_engine, create_session_factory, masked_url
from storage.locks import scheduler_lock_for

logger = logging.getLogger(__name__)


__all__ = ["Daemon", "check_schema", "is_loopback"]


class Daemon:
    """Owns the engine, metrics, loaded models, scheduler and HTTP server of one process.

    Lifecycle: construct, :meth:`start` (checks the schema and the token
    set-up, loads models, starts the scheduler leadership and the server
    thread), then :meth:`stop`, which stops accepting requests first and
    then lets running jobs finish.
    """

    def __init__(self, config: Config, *, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.engine = create_db_engine(config.database.url)
        self.session_factory = create_session_factory(self.engine)
        model_names = [model.name for model in config.models]
        self.metrics = Metrics(registry or CollectorRegistry(), model_names, self.session_factory)
        self.metrics.build_info.info(
            {
                "version": metadata.version("poisonwatch"),
                "jax_version": jax.__version__,
                "backend": jax.default_backend(),
                "devices": str(jax.device_count()),
            }
        )
        self.models = ModelRegistry(config, self.session_factory)
        self.api_state = ApiState(
            config=config,
            session_factory=self.session_factory,
            metrics=self.metrics,
            auth=TokenVerifier.for_server(config.server.host, config.server.token_sha256),
        )
        self.app = create_app(self.api_state)
        self.context = JobContext(config, self.session_factory, self.models, self.metrics)
        self.leadership: SchedulerLeadership | None = None
        self._server: uvicorn.Server | None = None
        self._server_thread: threading.Thread | None = None

    def start(self, *, serve_http: bool = True) -> None:
        check_schema(self.engine)
        cache_dir = self.config.influence.compilation_cache_dir
        if cache_dir:
            # Before the first model loads, so no program compiles outside the cache.
            logger.info("JAX compilation cache at %s", runtime.enable_compilation_cache(cache_dir))
        logger.info(
            "starting poisonwatch on %s with JAX backend %s (%d devices)",
            masked_url(self.config.database.url),
            jax.default_backend(),
            jax.device_count(),
        )
        if not is_loopback(self.config.server.host) and not self.config.server.token_sha256:
            raise AuthenticationConfigError(self.config.server.host)
        self.models.load_all()
        # The server starts first, so a port in use stops start-up before any job runs.
        if serve_http:
            self._start_server()
        if self.config.scheduler.enabled:
            self.leadership = SchedulerLeadership(
                self.context, scheduler_lock_for(self.config.database.url), self._set_scheduler_running
            )
            self.leadership.start()

    def _set_scheduler_running(self, running: bool) -> None:
        self.api_state.scheduler_running = running

    @property
    def is_leader(self) -> bool:
        return self.leadership is not None and self.leadership.is_leader

    def _start_server(self) -> None:
        config = uvicorn.Config(
            self.app,
            host=self.config.server.host,
            port=self.config.server.port,
            log_level="warning",
            access_log=False,
        )
        self._server = uvicorn.Server(config)
        self._server_thread = threading.Thread(target=self._server.run, name="poisonwatch-http", daemon=True)
        self._server_thread.start()
        while not self._server.started:
            if not self._server_thread.is_alive():
                raise ServerStartError(
                    f"HTTP server failed to listen on {self.config.server.host}:{self.config.server.port}; "
                    "is another process using the port? Set [server] port, or 0 for a free one"
                )
            threading.Event().wait(0.05)

    @property
    def base_url(self) -> str:
        """The URL the HTTP server listens on, with the real port when the config asked for port 0."""
        assert self._server is not None, "server not started"
        socket = self._server.servers[0].sockets[0]
        host, port = socket.getsockname()[:2]
        return f"http://{host}:{port}"

    def wait(self) -> None:
        """Block until the HTTP server stops (for example on SIGINT or SIGTERM)."""
        if self._server_thread is not None:
            while self._server_thread.is_alive():
                self._server_thread.join(0.5)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            if self._server_thread is not None:
                self._server_thread.join(10)
        if self.leadership is not None:
            self.leadership.stop()
        self.engine.dispose()
        logger.info("poisonwatch stopped")
