"""The metric definitions and the stored-results collector, each on a fresh registry."""

from __future__ import annotations

from importlib import metadata

import pytest
from prometheus_client import CollectorRegistry

from monitor.jobs import JobContext
from monitor.scheduler import build_scheduler
from monitor.metrics import MAX_CLASS_LABELS, BuildInfoCollector, JobName, Metrics, job_intervals
from monitor.config import SchedulerConfig
from storage import queries
from storage.db import create_db_engine, create_session_factory
from storage.models import IncidentState

MODEL = "toy"


@pytest.fixture
def session_factory(migrated_url):
    engine = create_db_engine(migrated_url)
    yield create_session_factory(engine)
    engine.dispose()


def register(session_factory, num_classes: int = 3, version: str = "v1") -> int:
    with session_factory.begin() as session:
        registered = queries.register_model_version(
            session, model=MODEL, version=version, loader="unused.module:load",
            input_shape=(2,), num_classes=num_classes, manifest=[],
        )
        session.flush()
        return registered.id


def evaluate(session_factory, version_id: int, per_class: list[float | None]) -> None:
    with session_factory.begin() as session:
        queries.record_heldout_evaluation(
            session, version_id, accuracy=0.8, per_class_accuracy=per_class, num_examples=10
        )


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.exposed_registry.get_sample_value(name, labels)


def test_class_accuracy_exported(session_factory):
    version_id = register(session_factory)
    evaluate(session_factory, version_id, [0.9, None, 0.5])
    metrics = Metrics(CollectorRegistry(), [MODEL], session_factory)
    assert sample(metrics, "poisonwatch_heldout_class_accuracy_ratio", model=MODEL, version="v1", **{"class": "0"}) == 0.9
    assert sample(metrics, "poisonwatch_heldout_class_accuracy_ratio", model=MODEL, version="v1", **{"class": "1"}) is None
    assert sample(metrics, "poisonwatch_heldout_class_accuracy_ratio", model=MODEL, version="v1", **{"class": "2"}) == 0.5
    assert sample(metrics, "poisonwatch_heldout_accuracy_ratio", model=MODEL, version="v1") == 0.8


def test_class_labels_capped(session_factory, caplog):
    classes = MAX_CLASS_LABELS + 20
    version_id = register(session_factory, num_classes=classes)
    evaluate(session_factory, version_id, [0.5] * classes)
    metrics = Metrics(CollectorRegistry(), [MODEL], session_factory)
    metrics.exposition()
    # A second scrape must not log the truncation again.
    text = metrics.exposition().decode()
    exported = [line for line in text.splitlines() if line.startswith("poisonwatch_heldout_class_accuracy_ratio{")]
    assert len(exported) == MAX_CLASS_LABELS
    assert f'class="{MAX_CLASS_LABELS - 1}"' in text
    assert f'class="{MAX_CLASS_LABELS}"' not in text
    assert len([record for record in caplog.records if "per-class accuracy" in record.message]) == 1


def test_class_accuracy_only_current_version(session_factory):
    old = register(session_factory, version="v1")
    evaluate(session_factory, old, [0.9, 0.9, 0.9])
    new = register(session_factory, version="v2")
    evaluate(session_factory, new, [0.1, 0.9, 0.9])
    metrics = Metrics(CollectorRegistry(), [MODEL], session_factory)
    assert sample(metrics, "poisonwatch_heldout_class_accuracy_ratio", model=MODEL, version="v1", **{"class": "0"}) is None
    assert sample(metrics, "poisonwatch_heldout_class_accuracy_ratio", model=MODEL, version="v2", **{"class": "0"}) == 0.1


def test_every_state_exported(session_factory):
    register(session_factory)
    metrics = Metrics(CollectorRegistry(), [MODEL], session_factory)
    for state in IncidentState:
        assert sample(metrics, "poisonwatch_incidents", model=MODEL, state=state.value) == 0


def test_series_start_at_zero():
    metrics = Metrics(CollectorRegistry(), [MODEL])
    assert sample(metrics, "poisonwatch_predictions_ingested_total", model=MODEL) == 0
    assert sample(metrics, "poisonwatch_influence_unconverged_solves_total", model=MODEL) == 0
    assert sample(metrics, "poisonwatch_influence_duration_seconds_count", model=MODEL) == 0
    assert sample(metrics, "poisonwatch_job_failures_total", job="heldout") == 0
    assert sample(metrics, "poisonwatch_requests_rejected_total", endpoint="labels", reason="conflict") == 0


def test_job_intervals_recorded():
    metrics = Metrics(CollectorRegistry(), [MODEL])
    assert sample(metrics, "poisonwatch_job_interval_seconds", job="heldout") is None
    metrics.record_job_intervals(job_intervals(SchedulerConfig(heldout_interval_seconds=120)))
    assert sample(metrics, "poisonwatch_job_interval_seconds", job="heldout") == 120
    assert sample(metrics, "poisonwatch_job_interval_seconds", job="incident_scan") == 10


def test_scheduler_exports_job_intervals(api_state, client):
    before = client.get("/metrics").text
    context = JobContext(api_state.config, api_state.session_factory, registry=None, metrics=api_state.metrics)
    build_scheduler(context)
    after = client.get("/metrics").text
    assert "poisonwatch_job_interval_seconds{" not in before
    assert 'poisonwatch_job_interval_seconds{job="influence"} 5.0' in after
    assert 'poisonwatch_job_interval_seconds{job="retention"}' not in after


def test_build_info_without_jax():
    registry = CollectorRegistry()
    registry.register(BuildInfoCollector(jax_initialised=False))
    labels = {
        "backend": "none",
        "devices": "0",
        "version": metadata.version("poisonwatch"),
        "jax_version": metadata.version("jax"),
    }
    assert registry.get_sample_value("poisonwatch_build_info", labels) == 1


def test_job_names_are_bounded():
    assert {job.value for job in JobName} == {"incident_scan", "influence", "heldout", "retention", "release_checks"}
