"""Shared fixtures: migrated databases, a model version without a model, fresh metric registries."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from sqlalchemy import text

from monitor.api import ApiState, create_app
from monitor.config import Config, DatabaseConfig, ModelConfig, ServerConfig
from monitor.metrics import Metrics
from storage import migrations, queries
from storage.db import create_db_engine, create_session_factory

# A model version registered without loading a model: the API validates
# requests against stored metadata only.
MODEL = "toy"
VERSION = "v1"
INPUT_SHAPE = (2, 3)
NUM_CLASSES = 3

POSTGRES_URL_VARIABLE = "POISONWATCH_TEST_POSTGRES_URL"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'poisonwatch.db'}"


@pytest.fixture
def migrated_url(sqlite_url: str) -> str:
    migrations.upgrade(sqlite_url)
    return sqlite_url


@pytest.fixture
def api_config(migrated_url: str) -> Config:
    return Config(
        database=DatabaseConfig(url=migrated_url),
        server=ServerConfig(max_batch_size=10, max_input_values=100),
        models=[ModelConfig(name=MODEL, loader="unused.module:load")],
    )


@pytest.fixture
def api_state(api_config: Config) -> Iterator[ApiState]:
    engine = create_db_engine(api_config.database.url)
    session_factory = create_session_factory(engine)
    with session_factory.begin() as session:
        queries.register_model_version(
            session,
            model=MODEL,
            version=VERSION,
            loader="unused.module:load",
            input_shape=INPUT_SHAPE,
            num_classes=NUM_CLASSES,
            manifest=[],
        )
    metrics = Metrics(CollectorRegistry(), [MODEL], session_factory)
    yield ApiState(config=api_config, session_factory=session_factory, metrics=metrics)
    engine.dispose()


@pytest.fixture
def client(api_state: ApiState) -> Iterator[TestClient]:
    with TestClient(create_app(api_state)) as test_client:
        yield test_client


def _reset_postgres(url: str) -> None:
    engine = create_db_engine(url)
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture
def postgres_url() -> str:
    """URL of an emptied PostgreSQL database; skips when none is configured."""
    url = os.environ.get(POSTGRES_URL_VARIABLE)
    if not url:
        pytest.skip(f"{POSTGRES_URL_VARIABLE} is not set; .ci/run sets it to the local PostgreSQL server")
    _reset_postgres(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each backend, for the storage contract suite."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'contract.db'}"
    return request.getfixturevalue("postgres_url")


# --- poisonwatch serve processes on the toy model ----------------------------

TOY_MODEL = "toy"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_toy_config(path: Path, url: str, port: int, *, scheduler: bool = True, interval: float = 0.5, extra: str = "") -> Path:
    """Write a TOML config that serves the toy model on 127.0.0.1:``port``."""
    path.write_text(
        f"""
[database]
url = "{url}"

[server]
host = "127.0.0.1"
port = {port}

[scheduler]
enabled = {"true" if scheduler else "false"}
incident_scan_interval_seconds = {interval}
influence_interval_seconds = {interval}
heldout_interval_seconds = {interval}

[[models]]
name = "{TOY_MODEL}"
loader = "tests.toy_model:load"
{extra}
"""
    )
    return path


class ServeProcess:
    """A ``poisonwatch serve`` subprocess; its standard error goes to a log file for failure messages."""

    def __init__(self, config: Path, log: Path, *, extra_args: Sequence[str] = ()) -> None:
        self.config = config
        self.log = log
        self.extra_args = list(extra_args)
        text_config = config.read_text()
        self.port = int(text_config.split("port = ", 1)[1].split()[0])
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, *, timeout: float = 90.0) -> ServeProcess:
        repository = Path(__file__).resolve().parent.parent
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "monitor.cli", "serve", "--config", str(self.config), *self.extra_args],
                cwd=repository,
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONPATH": str(repository)},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"serve not healthy within {timeout} s:\n{self.log_tail()}")

    def health(self) -> dict:
        return httpx.get(f"{self.base_url}/healthz", timeout=2.0).json()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def wait_for_incident_state(client: httpx.Client, state: str, timeout: float = 60.0) -> str | None:
    """Poll ``/v1/incidents`` until the first incident is in ``state``, and return the last state seen."""
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline and seen != state:
        incidents = client.get("/v1/incidents").json()
        seen = incidents[0]["state"] if incidents else None
        time.sleep(0.2)
    return seen


def toy_prediction(prediction_id: str, *, predicted_class: int = 0) -> dict:
    probabilities = [0.02, 0.02, 0.02]
    probabilities[predicted_class] = 0.96
    return {
        "prediction_id": prediction_id,
        "predicted_class": predicted_class,
        "probabilities": probabilities,
        "input": {"shape": [2, 2], "data": [0.1, 0.2, 0.3, 0.4]},
    }
