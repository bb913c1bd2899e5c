"""Storage contract suite, run against SQLite and PostgreSQL alike."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from storage import migrations, queries
from storage.db import create_db_engine, create_session_factory, masked_url
from storage.models import Incident, IncidentState, ModelVersion


@pytest.fixture
def session_factory(database_url: str) -> Iterator[sessionmaker[Session]]:
    migrations.upgrade(database_url)
    engine = create_db_engine(database_url)
    yield create_session_factory(engine)
    engine.dispose()


def manifest(n: int) -> list[queries.ManifestRow]:
    return [queries.ManifestRow(f"ex-{i}", f"{i:064x}", i % 3, "vendor-a" if i % 2 else "vendor-b") for i in range(n)]


def register(session: Session, version: str = "v1", n: int = 5) -> ModelVersion:
    return queries.register_model_version(
        session, model="m", version=version, loader="x:y", input_shape=[2], num_classes=3, manifest=manifest(n)
    )


def record(prediction_id: str, version_id: int, predicted_class: int, confidence: float) -> queries.PredictionRecord:
    return queries.PredictionRecord(
        prediction_id=prediction_id,
        model_version_id=version_id,
        predicted_class=predicted_class,
        confidence=confidence,
        probabilities=None,
        input_shape=[2],
        input_data=b"\0" * 8,
        content_digest=f"digest-{prediction_id}-{predicted_class}",
        predicted_at=dt.datetime.now(dt.UTC),
    )


def seed_labelled(session_factory, rows: list[tuple[str, int, float, int]]) -> int:
    """Store predictions ``(id, predicted class, confidence, label)`` with their labels."""
    with session_factory.begin() as session:
        version_id = register(session).id
        queries.insert_predictions(session, "m", [record(pid, version_id, cls, conf) for pid, cls, conf, _ in rows])
        queries.insert_labels(session, "m", [(pid, label) for pid, _, _, label in rows])
    return version_id


def test_register_stores_manifest_in_order(session_factory):
    with session_factory.begin() as session:
        version_id = register(session, n=7).id
    with session_factory() as session:
        rows = queries.training_examples_by_row(session, version_id, [0, 6])
    assert rows[0].example_id == "ex-0"
    assert rows[6].example_id == "ex-6"
    assert rows[6].source == "vendor-b"


def test_register_new_version_becomes_current(session_factory):
    with session_factory.begin() as session:
        register(session, "v1")
    with session_factory.begin() as session:
        register(session, "v2")
    with session_factory() as session:
        current = queries.current_versions(session)
        flags = dict(session.execute(select(ModelVersion.version, ModelVersion.is_current)).all())
    assert current["m"].version == "v2"
    assert flags == {"v1": False, "v2": True}


def test_register_same_version_keeps_manifest(session_factory):
    with session_factory.begin() as session:
        first = register(session, "v1", n=5).id
    with session_factory.begin() as session:
        again = register(session, "v1", n=9)
    assert again.id == first
    assert again.num_training_examples == 5


def test_incident_scan_opens_only_confident_errors(session_factory):
    seed_labelled(
        session_factory,
        [
            ("wrong-confident", 1, 0.95, 2),
            ("wrong-at-threshold", 1, 0.9, 0),
            ("wrong-unsure", 1, 0.6, 2),
            ("right-confident", 1, 0.99, 1),
        ],
    )
    with session_factory.begin() as session:
        opened = queries.open_misclassification_incidents(session, confidence_threshold=0.9)
        opened_ids = sorted(incident.prediction.prediction_id for incident in opened)
    assert opened_ids == ["wrong-at-threshold", "wrong-confident"]


def test_incident_scan_opens_each_prediction_once(session_factory):
    seed_labelled(session_factory, [("p", 1, 0.95, 2)])
    with session_factory.begin() as session:
        first = queries.open_misclassification_incidents(session, confidence_threshold=0.9)
    with session_factory.begin() as session:
        second = queries.open_misclassification_incidents(session, confidence_threshold=0.9)
    assert len(first) == 1
    assert second == []


def test_claim_is_exclusive(session_factory):
    seed_labelled(session_factory, [("p", 1, 0.95, 2)])
    with session_factory.begin() as session:
        queries.open_misclassification_incidents(session, confidence_threshold=0.9)
    with session_factory.begin() as session:
        first = queries.claim_next_incident(session, worker="a")
    with session_factory.begin() as session:
        second = queries.claim_next_incident(session, worker="b")
    assert first is not None
    assert first.state == IncidentState.ANALYZING
    assert first.claimed_by == "a"
    assert first.attempts == 1
    assert second is None


def test_release_claims_reopens_analyzing(session_factory):
    seed_labelled(session_factory, [("p", 1, 0.95, 2)])
    with session_factory.begin() as session:
        queries.open_misclassification_incidents(session, confidence_threshold=0.9)
        queries.claim_next_incident(session, worker="a")
    with session_factory.begin() as session:
        released = queries.release_claims(session)
    with session_factory() as session:
        incident = session.scalar(select(Incident))
    assert released == 1
    assert incident.state == IncidentState.OPEN
    assert incident.claimed_by is None


def test_failed_incident_requeued_after_backoff(session_factory):
    seed_labelled(session_factory, [("p", 1, 0.95, 2)])
    with session_factory.begin() as session:
        queries.open_misclassification_incidents(session, confidence_threshold=0.9)
        incident_id = queries.claim_next_incident(session, worker="a").id
        queries.mark_failed(session, incident_id, "solver produced NaN", worker="a")
    now = dt.datetime.now(dt.UTC)
    with session_factory.begin() as session:
        early = queries.requeue_failed_incidents(
            session, max_attempts=3, base_delay=dt.timedelta(minutes=1), now=now
        )
    with session_factory.begin() as session:
        late = queries.requeue_failed_incidents(
            session, max_attempts=3, base_delay=dt.timedelta(minutes=1), now=now + dt.timedelta(minutes=2)
        )
    assert early == 0
    assert late == 1


def test_failed_incident_not_requeued_past_limit(session_factory):
    seed_labelled(session_factory, [("p", 1, 0.95, 2)])
    with session_factory.begin() as session:
        queries.open_misclassification_incidents(session, confidence_threshold=0.9)
        incident_id = queries.claim_next_incident(session, worker="a").id
        queries.mark_failed(session, incident_id, "solver produced NaN", worker="a")
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    with session_factory.begin() as session:
        requeued = queries.requeue_failed_incidents(
            session, max_attempts=1, base_delay=dt.timedelta(seconds=1), now=later
        )
    assert requeued == 0


def test_analysis_stored_with_ranked_suspects(session_factory):
    version_id = seed_labelled(session_factory, [("p", 1, 0.95, 2)])
    with session_factory.begin() as session:
        queries.open_misclassification_incidents(session, confidence_threshold=0.9)
        incident = queries.claim_next_incident(session, worker="a")
        examples = queries.training_examples_by_row(session, version_id, [3, 1])
        queries.store_analysis(
            session,
            incident,
            worker="a",
            suspects=[(examples[3].id, -2.0), (examples[1].id, -1.0)],
            iterations=12,
            residual=1e-6,
            converged=True,
            negative_curvature=False,
            damping=0.01,
            seconds=0.5,
        )
        incident_id = incident.id
    with session_factory() as session:
        stored = queries.get_incident(session, incident_id)
    assert stored.state == IncidentState.ANALYZED
    assert [s.training_example.example_id for s in stored.suspects] == ["ex-3", "ex-1"]
    assert [s.rank for s in stored.suspects] == [1, 2]
    assert stored.solver_converged is True


def test_incident_counts_by_state(session_factory):
    seed_labelled(session_factory, [("p", 1, 0.95, 2), ("q", 0, 0.99, 1)])
    with session_factory.begin() as session:
        queries.open_misclassification_incidents(session, confidence_threshold=0.9)
        queries.claim_next_incident(session, worker="a")
    with session_factory() as session:
        counts = queries.incident_counts(session)
    assert sorted((model, state.value, count) for model, state, count in counts) == [
        ("m", "analyzing", 1),
        ("m", "open", 1),
    ]


def test_latest_heldout_evaluation_wins(session_factory):
    with session_factory.begin() as session:
        version_id = register(session).id
        queries.record_heldout_evaluation(session, version_id, accuracy=0.5, per_class_accuracy=[0.5], num_examples=2)
    with session_factory.begin() as session:
        queries.record_heldout_evaluation(session, version_id, accuracy=0.75, per_class_accuracy=[None], num_examples=4)
    with session_factory() as session:
        latest = queries.latest_heldout_evaluations(session)
    assert len(latest) == 1
    assert latest[0][1].accuracy == 0.75
    assert latest[0][1].per_class_accuracy == [None]


def test_masked_url_hides_password():
    masked = masked_url("postgresql+psycopg://user:s3cret@db.internal:5432/poisonwatch")
    assert "s3cret" not in masked
    assert "user:***@db.internal" in masked


def test_stale_claim_stores_nothing(session_factory):
    # A process that loses the scheduler lock and wins it back claims the
    # incident anew. The analysis of its first claim must not be stored.
    version_id = seed_labelled(session_factory, [("p", 1, 0.95, 2)])
    first_claim, second_claim = queries.new_claim("host:1"), queries.new_claim("host:1")
    with session_factory.begin() as session:
        queries.open_misclassification_incidents(session, confidence_threshold=0.9)
        incident_id = queries.claim_next_incident(session, worker=first_claim).id
    with session_factory.begin() as session:
        queries.release_claims(session)
        queries.claim_next_incident(session, worker=second_claim)
    analysis = {"iterations": 1, "residual": 0.0, "converged": True, "negative_curvature": False, "damping": 0.01, "seconds": 0.1}
    with session_factory.begin() as session:
        example = queries.training_examples_by_row(session, version_id, [1])[1]
        incident = queries.get_incident(session, incident_id)
        stale = queries.store_analysis(session, incident, worker=first_claim, suspects=[(example.id, -1.0)], **analysis)
        stale_failure = queries.mark_failed(session, incident_id, "stale", worker=first_claim)
    with session_factory.begin() as session:
        incident = queries.get_incident(session, incident_id)
        current = queries.store_analysis(session, incident, worker=second_claim, suspects=[(example.id, -1.0)], **analysis)
    assert first_claim != second_claim
    assert first_claim.startswith("host:1/")
    assert stale is False
    assert stale_failure is False
    assert current is True


def test_release_own_claims_matches_claim_ids(session_factory):
    seed_labelled(session_factory, [("p", 1, 0.95, 2), ("q", 0, 0.99, 1)])
    with session_factory.begin() as session:
        queries.open_misclassification_incidents(session, confidence_threshold=0.9)
        queries.claim_next_incident(session, worker=queries.new_claim("host:1"))
        queries.claim_next_incident(session, worker=queries.new_claim("host:12"))
    with session_factory.begin() as session:
        released = queries.release_claims(session, worker="host:1")
    with session_factory() as session:
        states = sorted((incident.state.value, incident.claimed_by or "") for incident in session.scalars(select(Incident)))
    assert released == 1
    assert states[0] == ("analyzing", states[0][1])
    assert states[0][1].startswith("host:12/")
    assert states[1] == ("open", "")
