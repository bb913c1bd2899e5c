"""SQLAlchemy 2 typed ORM models for everything poisonwatch persists.

Every constraint gets its name from :data:`NAMING_CONVENTION`, so Alembic can
drop or alter it by name on PostgreSQL and in SQLite batch mode alike.
"""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BIGINT primary keys on PostgreSQL; SQLite only auto-increments INTEGER keys.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> dt.datetime:
    """Return the current time as an aware UTC datetime."""
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """An aware UTC datetime on every backend.

    SQLite has no time zones and returns naive values, so values are stored as
    naive UTC there and given ``tzinfo=UTC`` again on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: poisonwatch stores aware UTC datetimes only")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class IncidentState(enum.StrEnum):
    """Workflow state of an incident: ``open -> analyzing -> analyzed -> acknowledged -> resolved``, or ``failed``."""

    OPEN = "open"
    ANALYZING = "analyzing"
    ANALYZED = "analyzed"
    FAILED = "failed"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"


class JobStatus(enum.StrEnum):
    """Outcome of one scheduled job run."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


def _enum_column(enum_class: type[enum.Enum], name: str) -> Enum:
    # Stored as VARCHAR plus a named CHECK constraint, not a native PostgreSQL
    # ENUM type: adding a state later is then an ordinary batch migration.
    return Enum(
        enum_class,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=32,
        values_callable=lambda members: [member.value for member in members],
    )


class ModelVersion(Base):
    """One registered version of a model, with what the API needs to validate inputs."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model", "version"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    model: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(128))
    loader: Mapped[str] = mapped_column(String(256))
    input_shape: Mapped[list[int]] = mapped_column(JSON)
    num_classes: Mapped[int] = mapped_column(Integer)
    num_training_examples: Mapped[int] = mapped_column(Integer)
    is_current: Mapped[bool] = mapped_column(Boolean, default=False)
    registered_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class TrainingExample(Base):
    """One row of a model version's training-data manifest."""

    __tablename__ = "training_examples"
    __table_args__ = (UniqueConstraint("model_version_id", "example_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    row_index: Mapped[int] = mapped_column(Integer)
    example_id: Mapped[str] = mapped_column(String(256))
    content_hash: Mapped[str] = mapped_column(String(64))
    label: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(256))
    added_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Prediction(Base):
    """A prediction reported by a serving application, with its input inline."""

    __tablename__ = "predictions"
    __table_args__ = (
        UniqueConstraint("model", "prediction_id"),
        Index(None, "model_version_id", "predicted_at"),
        # The retention job deletes by receipt time, oldest first.
        Index(None, "received_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    model: Mapped[str] = mapped_column(String(128))
    prediction_id: Mapped[str] = mapped_column(String(256))
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    predicted_class: Mapped[int] = mapped_column(Integer)
    confidence: Mapped[float] = mapped_column(Float)
    probabilities: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    input_shape: Mapped[list[int]] = mapped_column(JSON)
    input_data: Mapped[bytes] = mapped_column(LargeBinary)
    content_digest: Mapped[str] = mapped_column(String(64))
    predicted_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    label: Mapped[Label | None] = relationship(back_populates="prediction", uselist=False)


class Label(Base):
    """Ground truth for one prediction, usually arriving long after it."""

    __tablename__ = "labels"
    __table_args__ = (Index(None, "received_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    prediction_pk: Mapped[int] = mapped_column(
        ForeignKey("predictions.id", ondelete="CASCADE"), unique=True
    )
    label: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    prediction: Mapped[Prediction] = relationship(back_populates="label")


class Incident(Base):
    """An unexpected high-confidence misclassification awaiting or holding an influence analysis."""

    __tablename__ = "incidents"
    __table_args__ = (Index(None, "state", "updated_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    prediction_pk: Mapped[int] = mapped_column(
        ForeignKey("predictions.id", ondelete="CASCADE"), unique=True
    )
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32), default="misclassification")
    state: Mapped[IncidentState] = mapped_column(
        _enum_column(IncidentState, "incident_state"), default=IncidentState.OPEN
    )
    true_label: Mapped[int] = mapped_column(Integer)
    predicted_class: Mapped[int] = mapped_column(Integer)
    confidence: Mapped[float] = mapped_column(Float)
    opened_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claimed_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    failure_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    solver_iterations: Mapped[int | None] = mapped_column(Integer, nullable=True)
    solver_residual: Mapped[float | None] = mapped_column(Float, nullable=True)
    solver_converged: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    solver_damping: Mapped[float | None] = mapped_column(Float, nullable=True)
    solver_negative_curvature: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    analysis_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    solver: Mapped[str | None] = mapped_column(String(32), nullable=True)
    solver_captured: Mapped[float | None] = mapped_column(Float, nullable=True)
    ranking_reliable: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    score_kind: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # The most harmful data sources: a list of {"source", "total", "count", "most_negative"}.
    source_influence: Mapped[list[dict] | None] = mapped_column(JSON, nullable=True)
    acknowledged_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    resolved_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)

    prediction: Mapped[Prediction] = relationship()
    model_version: Mapped[ModelVersion] = relationship()
    suspects: Mapped[list[InfluenceResult]] = relationship(
        back_populates="incident", order_by="InfluenceResult.rank", cascade="all, delete-orphan"
    )


class InfluenceResult(Base):
    """One of the top-k training examples of an incident's influence ranking."""

    __tablename__ = "influence_results"
    __table_args__ = (UniqueConstraint("incident_id", "rank"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    incident_id: Mapped[int] = mapped_column(ForeignKey("incidents.id", ondelete="CASCADE"))
    rank: Mapped[int] = mapped_column(Integer)
    training_example_id: Mapped[int] = mapped_column(ForeignKey("training_examples.id", ondelete="CASCADE"))
    # The predicted change of the incident's loss if the example were removed.
    score: Mapped[float] = mapped_column(Float)
    # The score the ranking sorts by, for example ``score`` over the example's gradient norm.
    rank_score: Mapped[float | None] = mapped_column(Float, nullable=True)

    incident: Mapped[Incident] = relationship(back_populates="suspects")
    training_example: Mapped[TrainingExample] = relationship()


class HeldOutEvaluation(Base):
    """Accuracy of a model version on its held-out set at one point in time."""

    __tablename__ = "heldout_evaluations"
    __table_args__ = (Index(None, "model_version_id", "evaluated_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    evaluated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    num_examples: Mapped[int] = mapped_column(Integer)
    accuracy: Mapped[float] = mapped_column(Float)
    per_class_accuracy: Mapped[list[float | None]] = mapped_column(JSON)


class JobRun(Base):
    """One run of a scheduled job, for auditing and for the last-success metric.

    ``scheduled_for`` is the start of the interval slot a scheduled run
    belongs to. The unique constraint on ``(job, scheduled_for)`` lets only one
    replica run a job per slot. Runs started by hand leave it NULL, and NULLs
    never collide.
    """

    __tablename__ = "job_runs"
    __table_args__ = (Index(None, "job", "started_at"), UniqueConstraint("job", "scheduled_for"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job: Mapped[str] = mapped_column(String(64))
    status: Mapped[JobStatus] = mapped_column(_enum_column(JobStatus, "job_status"))
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    scheduled_for: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    runner: Mapped[str | None] = mapped_column(String(128), nullable=True)


class ReleaseCheckKind(enum.StrEnum):
    """A per-version computation done once and reused by every incident of that version."""

    GRADIENT_NORMS = "gradient_norms"
    HESSIAN_FACTORS = "hessian_factors"


class ReleaseCheck(Base):
    """The stored result of one release check of a model version.

    ``data`` is the serialised result and ``format_version`` the version of
    its format, checked on load; a result of an older format is recomputed.
    """

    __tablename__ = "release_checks"
    __table_args__ = (UniqueConstraint("model_version_id", "kind"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    kind: Mapped[ReleaseCheckKind] = mapped_column(_enum_column(ReleaseCheckKind, "release_check_kind"))
    format_version: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    computed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    seconds: Mapped[float] = mapped_column(Float)
