"""Queries the daemon runs, each inside a session the caller owns and commits.

Functions here never commit: the caller decides the transaction, so an API
request either stores all of its rows or none of them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Sequence

from sqlalchemy import and_, func, select, update
from sqlalchemy.orm import Session, selectinload

from storage.models import (
    HeldOutEvaluation,
    Incident,
    IncidentState,
    InfluenceResult,
    JobRun,
    JobStatus,
    Label,
    ModelVersion,
    Prediction,
    TrainingExample,
    utcnow,
)


# Rows per INSERT of a manifest, to bound the size of one statement.
MANIFEST_CHUNK_ROWS = 5000


@dataclasses.dataclass(frozen=True)
class ManifestRow:
    """One training example as a model version's manifest lists it."""

    example_id: str
    content_hash: str
    label: int
    source: str
    added_at: dt.datetime | None = None


@dataclasses.dataclass(frozen=True)
class PredictionRecord:
    """A validated prediction ready to store; ``content_digest`` decides idempotency."""

    prediction_id: str
    model_version_id: int
    predicted_class: int
    confidence: float
    probabilities: bytes | None
    input_shape: list[int]
    input_data: bytes
    content_digest: str
    predicted_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class WriteOutcome:
    """Outcome of a batch write: rows stored, repeats ignored, and the ids that block it.

    ``conflicts`` lists ids already stored with different content and
    ``unknown`` ids that reference nothing; the caller must roll back when
    either is non-empty.
    """

    accepted: int
    duplicates: int
    conflicts: list[str] = dataclasses.field(default_factory=list)
    unknown: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.conflicts and not self.unknown


# --- model versions ----------------------------------------------------------


def register_model_version(
    session: Session,
    *,
    model: str,
    version: str,
    loader: str,
    input_shape: Sequence[int],
    num_classes: int,
    manifest: Sequence[ManifestRow],
) -> ModelVersion:
    """Store a model version with its manifest, unless it exists, and make it the current one.

    Re-registering an existing version keeps its stored manifest: a version is
    immutable once registered.
    """
    existing = session.scalar(
        select(ModelVersion).where(ModelVersion.model == model, ModelVersion.version == version)
    )
    if existing is None:
        existing = ModelVersion(
            model=model,
            version=version,
            loader=loader,
            input_shape=list(input_shape),
            num_classes=num_classes,
            num_training_examples=len(manifest),
        )
        session.add(existing)
        session.flush()
        rows = [
            {
                "model_version_id": existing.id,
                "row_index": row_index,
                "example_id": row.example_id,
                "content_hash": row.content_hash,
                "label": row.label,
                "source": row.source,
                "added_at": row.added_at,
            }
            for row_index, row in enumerate(manifest)
        ]
        for start in range(0, len(rows), MANIFEST_CHUNK_ROWS):
            session.execute(TrainingExample.__table__.insert(), rows[start : start + MANIFEST_CHUNK_ROWS])
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.model == model)
        .values(is_current=ModelVersion.id == existing.id)
    )
    existing.is_current = True
    return existing


def current_versions(session: Session) -> dict[str, ModelVersion]:
    """Return the current version of every registered model, by model name."""
    rows = session.scalars(select(ModelVersion).where(ModelVersion.is_current))
    return {row.model: row for row in rows}


def find_version(session: Session, model: str, version: str) -> ModelVersion | None:
    return session.scalar(
        select(ModelVersion).where(ModelVersion.model == model, ModelVersion.version == version)
    )


def training_examples_by_row(
    session: Session, model_version_id: int, row_indices: Iterable[int]
) -> dict[int, TrainingExample]:
    """Return the manifest rows of a model version at the given row indices."""
    rows = session.scalars(
        select(TrainingExample).where(
            TrainingExample.model_version_id == model_version_id,
            TrainingExample.row_index.in_(list(row_indices)),
        )
    )
    return {row.row_index: row for row in rows}


# --- predictions and labels --------------------------------------------------


def insert_predictions(session: Session, model: str, records: Sequence[PredictionRecord]) -> WriteOutcome:
    """Insert the records that are new; report repeats with the same and with other content."""
    ids = [record.prediction_id for record in records]
    stored = dict(
        session.execute(
            select(Prediction.prediction_id, Prediction.content_digest).where(
                Prediction.model == model, Prediction.prediction_id.in_(ids)
            )
        ).all()
    )
    new_rows = []
    duplicates = 0
    conflicts = []
    seen_in_batch: dict[str, str] = {}
    for record in records:
        digest = stored.get(record.prediction_id) or seen_in_batch.get(record.prediction_id)
        if digest is None:
            seen_in_batch[record.prediction_id] = record.content_digest
            new_rows.append({"model": model, **dataclasses.asdict(record), "received_at": utcnow()})
        elif digest == record.content_digest:
            duplicates += 1
        else:
            conflicts.append(record.prediction_id)
    if conflicts:
        return WriteOutcome(accepted=0, duplicates=duplicates, conflicts=conflicts)
    if new_rows:
        session.execute(Prediction.__table__.insert(), new_rows)
    return WriteOutcome(accepted=len(new_rows), duplicates=duplicates)


def insert_labels(session: Session, model: str, labels: Sequence[tuple[str, int]]) -> WriteOutcome:
    """Attach ground-truth labels to stored predictions, given as ``(prediction_id, label)`` pairs."""
    ids = [prediction_id for prediction_id, _ in labels]
    rows = session.execute(
        select(Prediction.prediction_id, Prediction.id, Label.label)
        .outerjoin(Label, Label.prediction_pk == Prediction.id)
        .where(Prediction.model == model, Prediction.prediction_id.in_(ids))
    ).all()
    found = {prediction_id: (pk, label) for prediction_id, pk, label in rows}
    unknown = [prediction_id for prediction_id in ids if prediction_id not in found]
    if unknown:
        return WriteOutcome(accepted=0, duplicates=0, unknown=unknown)

    new_rows = []
    duplicates = 0
    conflicts = []
    seen_in_batch: dict[str, int] = {}
    for prediction_id, label in labels:
        pk, stored_label = found[prediction_id]
        previous = stored_label if stored_label is not None else seen_in_batch.get(prediction_id)
        if previous is None:
            seen_in_batch[prediction_id] = label
            new_rows.append({"prediction_pk": pk, "label": label, "received_at": utcnow()})
        elif previous == label:
            duplicates += 1
        else:
            conflicts.append(prediction_id)
    if conflicts:
        return WriteOutcome(accepted=0, duplicates=duplicates, conflicts=conflicts)
    if new_rows:
        session.execute(Label.__table__.insert(), new_rows)
    return WriteOutcome(accepted=len(new_rows), duplicates=duplicates)


# --- incidents ---------------------------------------------------------------


def open_misclassification_incidents(session: Session, *, confidence_threshold: float) -> list[Incident]:
    """Open an incident for each labelled prediction that is wrong with confidence >= the threshold.

    A prediction opens at most one incident, ever: a resolved incident is not reopened.
    """
    candidates = session.execute(
        select(Prediction.id, Prediction.model_version_id, Label.label, Prediction.predicted_class, Prediction.confidence)
        .join(Label, Label.prediction_pk == Prediction.id)
        .outerjoin(Incident, Incident.prediction_pk == Prediction.id)
        .where(
            Incident.id.is_(None),
            Label.label != Prediction.predicted_class,
            Prediction.confidence >= confidence_threshold,
        )
        .order_by(Prediction.id)
    ).all()
    now = utcnow()
    incidents = [
        Incident(
            prediction_pk=prediction_pk,
            model_version_id=model_version_id,
            true_label=true_label,
            predicted_class=predicted_class,
            confidence=confidence,
            state=IncidentState.OPEN,
            opened_at=now,
            updated_at=now,
        )
        for prediction_pk, model_version_id, true_label, predicted_class, confidence in candidates
    ]
    session.add_all(incidents)
    session.flush()
    return incidents


def claim_next_incident(session: Session, *, worker: str) -> Incident | None:
    """Move the oldest open incident to ``analyzing`` for ``worker`` and return it.

    The claim is a conditional UPDATE on the state, so two workers can never
    claim the same incident: the loser's UPDATE matches no row.
    """
    while True:
        incident_id = session.scalar(
            select(Incident.id).where(Incident.state == IncidentState.OPEN).order_by(Incident.id).limit(1)
        )
        if incident_id is None:
            return None
        result = session.execute(
            update(Incident)
            .where(Incident.id == incident_id, Incident.state == IncidentState.OPEN)
            .values(
                state=IncidentState.ANALYZING,
                claimed_by=worker,
                attempts=Incident.attempts + 1,
                updated_at=utcnow(),
            )
        )
        if result.rowcount == 1:
            return session.get(Incident, incident_id, populate_existing=True)


def store_analysis(
    session: Session,
    incident: Incident,
    *,
    suspects: Sequence[tuple[int, float]],
    iterations: int,
    residual: float,
    converged: bool,
    negative_curvature: bool,
    damping: float,
    seconds: float,
) -> None:
    """Record an incident's top-k suspects, as ``(training_example_pk, score)`` pairs, and mark it analyzed."""
    incident.suspects.clear()
    session.flush()
    incident.suspects.extend(
        InfluenceResult(rank=rank, training_example_id=example_pk, score=score)
        for rank, (example_pk, score) in enumerate(suspects, start=1)
    )
    incident.state = IncidentState.ANALYZED
    incident.solver_iterations = iterations
    incident.solver_residual = residual
    incident.solver_converged = converged
    incident.solver_damping = damping
    incident.solver_negative_curvature = negative_curvature
    incident.analysis_seconds = seconds
    incident.failure_reason = None
    incident.claimed_by = None
    incident.updated_at = utcnow()


def mark_failed(session: Session, incident_id: int, reason: str) -> None:
    session.execute(
        update(Incident)
        .where(Incident.id == incident_id)
        .values(state=IncidentState.FAILED, failure_reason=reason, claimed_by=None, updated_at=utcnow())
    )


def requeue_failed_incidents(
    session: Session, *, max_attempts: int, base_delay: dt.timedelta, now: dt.datetime | None = None
) -> int:
    """Reopen failed incidents whose retry delay has passed; the delay doubles with each attempt."""
    now = now or utcnow()
    failed = session.scalars(
        select(Incident).where(Incident.state == IncidentState.FAILED, Incident.attempts < max_attempts)
    ).all()
    reopened = 0
    for incident in failed:
        if incident.updated_at + base_delay * 2 ** max(incident.attempts - 1, 0) <= now:
            incident.state = IncidentState.OPEN
            incident.updated_at = now
            reopened += 1
    return reopened


def release_claims(session: Session) -> int:
    """Return every ``analyzing`` incident to ``open``, for a scheduler that starts after a stop."""
    result = session.execute(
        update(Incident)
        .where(Incident.state == IncidentState.ANALYZING)
        .values(state=IncidentState.OPEN, claimed_by=None, updated_at=utcnow())
    )
    return result.rowcount


def list_incidents(
    session: Session,
    *,
    state: IncidentState | None = None,
    model: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[Incident]:
    query = (
        select(Incident)
        .join(ModelVersion, ModelVersion.id == Incident.model_version_id)
        .options(selectinload(Incident.model_version), selectinload(Incident.prediction))
        .order_by(Incident.id.desc())
        .limit(limit)
        .offset(offset)
    )
    if state is not None:
        query = query.where(Incident.state == state)
    if model is not None:
        query = query.where(ModelVersion.model == model)
    return list(session.scalars(query))


def get_incident(session: Session, incident_id: int) -> Incident | None:
    """Return an incident with its prediction, model version and suspects loaded."""
    return session.scalar(
        select(Incident)
        .where(Incident.id == incident_id)
        .options(
            selectinload(Incident.model_version),
            selectinload(Incident.prediction).selectinload(Prediction.label),
            selectinload(Incident.suspects).selectinload(InfluenceResult.training_example),
        )
    )


def incident_counts(session: Session) -> list[tuple[str, IncidentState, int]]:
    """Return ``(model, state, count)`` for every combination that has incidents."""
    rows = session.execute(
        select(ModelVersion.model, Incident.state, func.count(Incident.id))
        .join(ModelVersion, ModelVersion.id == Incident.model_version_id)
        .group_by(ModelVersion.model, Incident.state)
    ).all()
    return list(rows)


# --- held-out evaluations ----------------------------------------------------


def record_heldout_evaluation(
    session: Session,
    model_version_id: int,
    *,
    accuracy: float,
    per_class_accuracy: Sequence[float | None],
    num_examples: int,
) -> HeldOutEvaluation:
    evaluation = HeldOutEvaluation(
        model_version_id=model_version_id,
        accuracy=accuracy,
        per_class_accuracy=list(per_class_accuracy),
        num_examples=num_examples,
        evaluated_at=utcnow(),
    )
    session.add(evaluation)
    return evaluation


def latest_heldout_evaluations(session: Session) -> list[tuple[ModelVersion, HeldOutEvaluation]]:
    """Return the newest held-out evaluation of each current model version."""
    newest = (
        select(HeldOutEvaluation.model_version_id, func.max(HeldOutEvaluation.id).label("evaluation_id"))
        .group_by(HeldOutEvaluation.model_version_id)
        .subquery()
    )
    rows = session.execute(
        select(ModelVersion, HeldOutEvaluation)
        .join(newest, newest.c.model_version_id == ModelVersion.id)
        .join(HeldOutEvaluation, and_(HeldOutEvaluation.id == newest.c.evaluation_id))
        .where(ModelVersion.is_current)
    ).all()
    return list(rows)


# --- job runs ----------------------------------------------------------------


def start_job_run(session: Session, job: str) -> JobRun:
    run = JobRun(job=job, status=JobStatus.RUNNING, started_at=utcnow())
    session.add(run)
    session.flush()
    return run


def finish_job_run(session: Session, run_id: int, *, status: JobStatus, error: str | None = None) -> None:
    session.execute(
        update(JobRun).where(JobRun.id == run_id).values(status=status, error=error, finished_at=utcnow())
    )
