"""Migrations upgrade, downgrade and upgrade again, and match the ORM models."""

from __future__ import annotations

import datetime as dt

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData, Table, func, inspect, select
from sqlalchemy.exc import IntegrityError

from storage import migrations, queries
from storage.db import create_db_engine, create_session_factory
from storage.models import NAMING_CONVENTION, Base, Prediction

TABLES = {
    "model_versions",
    "training_examples",
    "predictions",
    "labels",
    "incidents",
    "influence_results",
    "heldout_evaluations",
    "job_runs",
}


def test_upgrade_creates_every_table(database_url):
    migrations.upgrade(database_url)
    engine = create_db_engine(database_url)
    assert TABLES <= set(inspect(engine).get_table_names())
    assert migrations.current_revision(engine) == migrations.head_revision()
    engine.dispose()


def test_downgrade_removes_every_table(database_url):
    migrations.upgrade(database_url)
    migrations.downgrade(database_url, "base")
    engine = create_db_engine(database_url)
    assert not TABLES & set(inspect(engine).get_table_names())
    assert migrations.current_revision(engine) is None
    engine.dispose()


def test_upgrade_after_downgrade_keeps_working(database_url):
    migrations.upgrade(database_url)
    migrations.downgrade(database_url, "base")
    migrations.upgrade(database_url)
    engine = create_db_engine(database_url)
    session_factory = create_session_factory(engine)
    with session_factory.begin() as session:
        version = queries.register_model_version(
            session, model="m", version="1", loader="x:y", input_shape=[2], num_classes=2, manifest=[]
        )
        session.add(
            Prediction(
                model="m",
                prediction_id="p",
                model_version_id=version.id,
                predicted_class=1,
                confidence=0.9,
                input_shape=[2],
                input_data=b"\0" * 8,
                content_digest="d",
                predicted_at=dt.datetime.now(dt.UTC),
            )
        )
    with session_factory() as session:
        stored = session.scalar(select(Prediction))
    assert stored.predicted_at.tzinfo is not None
    engine.dispose()


def test_models_match_migrations(database_url):
    migrations.upgrade(database_url)
    engine = create_db_engine(database_url)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []
    engine.dispose()


def test_every_constraint_is_named(database_url):
    migrations.upgrade(database_url)
    engine = create_db_engine(database_url)
    inspector = inspect(engine)
    for table in TABLES:
        for unique in inspector.get_unique_constraints(table):
            assert unique["name"] and unique["name"].startswith("uq_"), (table, unique)
        for foreign_key in inspector.get_foreign_keys(table):
            assert foreign_key["name"] and foreign_key["name"].startswith("fk_"), (table, foreign_key)
        for index in inspector.get_indexes(table):
            if index.get("duplicates_constraint"):
                continue
            assert index["name"].startswith("ix_"), (table, index)
    engine.dispose()


def test_naming_convention_covers_constraint_kinds():
    assert set(NAMING_CONVENTION) == {"ix", "uq", "ck", "fk", "pk"}


@pytest.mark.parametrize("revision", ["0001", "0002"], ids=["initial-schema", "operations"])
def test_each_revision_is_reachable(sqlite_url, revision):
    migrations.upgrade(sqlite_url, revision)
    engine = create_db_engine(sqlite_url)
    assert migrations.current_revision(engine) == revision
    engine.dispose()


def _job_run_row(scheduled_for: dt.datetime) -> dict:
    return {"job": "heldout", "status": "succeeded", "started_at": scheduled_for, "scheduled_for": scheduled_for}


def test_operations_migration_round_trip_keeps_rows(database_url):
    migrations.upgrade(database_url, "0001")
    engine = create_db_engine(database_url)
    runs = Table("job_runs", MetaData(), autoload_with=engine)
    started = dt.datetime(2027, 1, 1, tzinfo=dt.UTC)
    with engine.begin() as connection:
        connection.execute(
            runs.insert(), [{"job": "heldout", "status": "succeeded", "started_at": started} for _ in range(3)]
        )

    migrations.upgrade(database_url, "0002")
    migrations.downgrade(database_url, "0001")
    migrations.upgrade(database_url, "0002")

    runs = Table("job_runs", MetaData(), autoload_with=engine)
    with engine.connect() as connection:
        count = connection.scalar(select(func.count()).select_from(runs))
    unique_names = {unique["name"] for unique in inspect(engine).get_unique_constraints("job_runs")}
    assert count == 3
    assert "uq_job_runs_job_scheduled_for" in unique_names
    with engine.begin() as connection:
        connection.execute(runs.insert(), _job_run_row(started))
    with pytest.raises(IntegrityError):
        with engine.begin() as connection:
            connection.execute(runs.insert(), _job_run_row(started))
    engine.dispose()
