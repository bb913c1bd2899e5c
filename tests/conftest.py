"""Shared fixtures: migrated databases, a model version without a model, fresh metric registries."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

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
