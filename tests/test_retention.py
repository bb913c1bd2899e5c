"""Retention: expired predictions and labels go in bounded batches; incident data stays."""

from __future__ import annotations

import datetime as dt

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import func, select, update

from monitor.config import Config, DatabaseConfig, RetentionConfig
from monitor.jobs import JobContext, apply_retention
from monitor.metrics import Metrics
from storage import migrations, queries
from storage.db import create_db_engine, create_session_factory
from storage.models import Incident, Label, Prediction

OLD = dt.datetime.now(dt.UTC) - dt.timedelta(days=40)


@pytest.fixture
def seeded(database_url):
    """Ten predictions received 40 days ago, each labelled wrongly; the first opened an incident."""
    migrations.upgrade(database_url)
    engine = create_db_engine(database_url)
    session_factory = create_session_factory(engine)
    with session_factory.begin() as session:
        version = queries.register_model_version(
            session, model="m", version="1", loader="x:y", input_shape=[2], num_classes=3, manifest=[]
        )
        records = [
            queries.PredictionRecord(f"p-{index}", version.id, 1, 0.5 if index else 0.99, None, [2], bytes(8), f"d{index}", OLD)
            for index in range(10)
        ]
        queries.insert_predictions(session, "m", records)
        queries.insert_labels(session, "m", [(f"p-{index}", 2) for index in range(10)])
        queries.open_misclassification_incidents(session, confidence_threshold=0.9)
        session.execute(update(Prediction).values(received_at=OLD))
        session.execute(update(Label).values(received_at=OLD))
    yield database_url, session_factory
    engine.dispose()


def context_for(url: str, session_factory, **retention) -> JobContext:
    config = Config(database=DatabaseConfig(url=url), retention=RetentionConfig(**retention))
    return JobContext(config, session_factory, registry=None, metrics=Metrics(CollectorRegistry(), ["m"]))


def counts(session_factory) -> tuple[int, int, int]:
    with session_factory() as session:
        return (
            session.scalar(select(func.count(Prediction.id))),
            session.scalar(select(func.count(Label.id))),
            session.scalar(select(func.count(Incident.id))),
        )


def test_retention_runs_in_bounded_batches(seeded):
    url, session_factory = seeded
    context = context_for(url, session_factory, predictions_days=30, batch_size=3, max_batches_per_run=2)
    first = apply_retention(context)
    after_first = counts(session_factory)
    second = apply_retention(context)
    after_second = counts(session_factory)
    assert first == {"predictions": 6, "labels": 0}
    assert after_first == (4, 4, 1)
    assert second == {"predictions": 3, "labels": 0}
    assert after_second == (1, 1, 1)


def test_retention_keeps_incident_prediction(seeded):
    url, session_factory = seeded
    apply_retention(context_for(url, session_factory, predictions_days=30))
    with session_factory() as session:
        kept = session.scalars(select(Prediction.prediction_id)).all()
    assert kept == ["p-0"]
    assert counts(session_factory) == (1, 1, 1)


def test_label_retention_keeps_predictions(seeded):
    url, session_factory = seeded
    deleted = apply_retention(context_for(url, session_factory, labels_days=30))
    assert deleted == {"predictions": 0, "labels": 9}
    assert counts(session_factory) == (10, 1, 1)


def test_retention_spares_recent_rows(seeded):
    url, session_factory = seeded
    deleted = apply_retention(context_for(url, session_factory, predictions_days=60, labels_days=60))
    assert deleted == {"predictions": 0, "labels": 0}
    assert counts(session_factory) == (10, 10, 1)
