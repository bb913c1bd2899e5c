"""The scheduled jobs: incident scan, influence analysis, held-out evaluation and retention.

Each job is a plain function of a :class:`JobContext`, so tests and the CLI
can run one directly; :mod:`monitor.scheduler` runs them on intervals.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable

import numpy as np
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from detectors import heldout, influence, ranking
from monitor.config import Config
from monitor.metrics import JobName, Metrics
from monitor.registry import ModelRegistry
from monitor.release_checks import ReleaseChecks
from storage import queries
from storage.models import Incident, JobStatus

logger = logging.getLogger(__name__)

# Data sources stored per incident, the most harmful (most negative summed influence) first.
MAX_STORED_SOURCES = 10


class JobSkipped(enum.Enum):
    """Return value of a scheduled run that did no work, so the listener records no success."""

    BACKING_OFF = "backing_off"
    SLOT_TAKEN = "slot_taken"


def _default_worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def is_database_unavailable(error: BaseException) -> bool:
    """True for errors that mean the database cannot be reached, as opposed to a bug or bad data."""
    if isinstance(error, (OperationalError, InterfaceError)):
        return True
    return isinstance(error, DBAPIError) and error.connection_invalidated


class JobBackoff:
    """Pauses a job after consecutive database failures: one interval, doubling, up to a maximum."""

    def __init__(self, max_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._max_seconds = max_seconds
        self._clock = clock
        self._failures: dict[str, int] = {}
        self._resume_at: dict[str, float] = {}
        self._lock = threading.Lock()

    def paused(self, job: str) -> bool:
        with self._lock:
            return self._clock() < self._resume_at.get(job, -math.inf)

    def failed(self, job: str, interval_seconds: float) -> float:
        """Record a failure and return the pause before the next attempt, in seconds."""
        with self._lock:
            failures = self._failures.get(job, 0) + 1
            self._failures[job] = failures
            pause = min(interval_seconds * 2 ** (failures - 1), self._max_seconds)
            self._resume_at[job] = self._clock() + pause
            return pause

    def succeeded(self, job: str) -> None:
        with self._lock:
            self._failures.pop(job, None)
            self._resume_at.pop(job, None)


@dataclasses.dataclass
class JobContext:
    """The configuration, database, loaded models and metrics that every job uses.

    ``stopping`` is set on shutdown or loss of leadership; long jobs check it
    between units of work and return early.
    """

    config: Config
    session_factory: sessionmaker[Session]
    registry: ModelRegistry
    metrics: Metrics
    worker: str = dataclasses.field(default_factory=_default_worker)
    stopping: threading.Event = dataclasses.field(default_factory=threading.Event)
    backoff: JobBackoff | None = None
    release_checks: ReleaseChecks | None = None

    def __post_init__(self) -> None:
        if self.backoff is None:
            self.backoff = JobBackoff(self.config.scheduler.max_backoff_seconds)
        if self.release_checks is None:
            self.release_checks = ReleaseChecks(self.session_factory, self.config.influence)


def slot_start(now: dt.datetime, interval_seconds: float) -> dt.datetime:
    """Return the start of the interval slot containing ``now``, on a grid from the Unix epoch."""
    timestamp = math.floor(now.timestamp() / interval_seconds) * interval_seconds
    return dt.datetime.fromtimestamp(timestamp, dt.UTC)


def recorded(
    job: str, run: Callable[[JobContext], object], *, interval_seconds: float | None = None
) -> Callable[[JobContext], object]:
    """Wrap a job so each run is stored in ``job_runs``, timed, and paused while the database is away.

    With ``interval_seconds``, a run first claims its slot of that length in
    ``job_runs``; when another replica already ran the slot, it skips. A
    run that fails because the database is unreachable pauses the job (see
    :class:`JobBackoff`); every exception still propagates to the scheduler's
    listener, which logs and counts it.
    """
    backoff_interval = interval_seconds or 1.0

    def run_recorded(context: JobContext) -> object:
        assert context.backoff is not None
        if context.backoff.paused(job):
            return JobSkipped.BACKING_OFF
        try:
            result = _run_in_slot(job, run, context, interval_seconds)
        except BaseException as error:
            if is_database_unavailable(error):
                pause = context.backoff.failed(job, backoff_interval)
                logger.warning("job %s: database unavailable, pausing it for %.1f s", job, pause)
            raise
        context.backoff.succeeded(job)
        return result

    run_recorded.__name__ = f"{job}_job"
    return run_recorded


def _run_in_slot(job: str, run: Callable[[JobContext], object], context: JobContext, interval_seconds: float | None) -> object:
    scheduled_for = None if interval_seconds is None else slot_start(dt.datetime.now(dt.UTC), interval_seconds)
    with context.session_factory.begin() as session:
        run_id = queries.start_job_run(session, job, scheduled_for=scheduled_for, runner=context.worker)
    if run_id is None:
        logger.info("job %s: slot %s already has a recorded run (by this process or a replica); skipping", job, scheduled_for)
        return JobSkipped.SLOT_TAKEN

    started = time.perf_counter()
    try:
        result = run(context)
    except BaseException as error:
        try:
            with context.session_factory.begin() as session:
                queries.finish_job_run(session, run_id, status=JobStatus.FAILED, error=repr(error)[:2000])
        except DBAPIError:
            # The run row stays 'running'; the original error matters more.
            logger.warning("job %s: could not record the failure of run %d", job, run_id)
        raise
    finally:
        context.metrics.job_duration.labels(job=job).observe(time.perf_counter() - started)
    with context.session_factory.begin() as session:
        queries.finish_job_run(session, run_id, status=JobStatus.SUCCEEDED)
    return result


def scan_incidents(context: JobContext) -> int:
    """Open incidents for new unexpected high-confidence misclassifications; return how many."""
    with context.session_factory.begin() as session:
        incidents = queries.open_misclassification_incidents(
            session, confidence_threshold=context.config.incidents.confidence_threshold
        )
        opened = [(incident.id, incident.model_version_id) for incident in incidents]
        models = {version.id: version.model for version in queries.current_versions(session).values()}
        requeued = queries.requeue_failed_incidents(
            session,
            max_attempts=context.config.incidents.max_attempts,
            base_delay=dt.timedelta(seconds=context.config.incidents.retry_base_seconds),
        )
    for incident_id, version_id in opened:
        model = models.get(version_id)
        if model is not None:
            context.metrics.incidents_opened.labels(model=model).inc()
        logger.info("opened incident %d for model version %d", incident_id, version_id)
    if requeued:
        logger.info("reopened %d failed incidents for another analysis attempt", requeued)
    return len(opened)


def analyze_incidents(context: JobContext, *, limit: int | None = None) -> int:
    """Analyze open incidents one by one until none is left (or ``limit``); return how many."""
    analyzed = 0
    while limit is None or analyzed < limit:
        if context.stopping.is_set():
            logger.info("stopping: leaving the remaining open incidents for the next scheduler")
            return analyzed
        claim = queries.new_claim(context.worker)
        with context.session_factory.begin() as session:
            incident = queries.claim_next_incident(session, worker=claim)
            if incident is None:
                return analyzed
            incident_id = incident.id
        analyze_incident(context, incident_id, claim)
        analyzed += 1
    return analyzed


def analyze_incident(context: JobContext, incident_id: int, claim: str) -> None:
    """Rank the training examples of one claimed incident by influence and store the top k.

    ``claim`` is the claim id the incident was claimed with. The result is
    stored only while that claim holds. An exception from the computation is
    stored on the incident as its failure reason instead of raised, so one
    bad incident does not stop the others.
    """
    with context.session_factory() as session:
        incident = queries.get_incident(session, incident_id)
        version = incident.model_version
        prediction = incident.prediction
        true_label = incident.true_label
        x = np.frombuffer(prediction.input_data, dtype="<f4").reshape(prediction.input_shape)

    bundle = context.registry.bundle_for(version)
    if bundle is None:
        _fail(context, incident_id, claim, version.model, f"model {version.model} version {version.version} is not the loaded version")
        return

    settings = context.config.influence
    started = time.perf_counter()
    try:
        # Loaded or computed once per version; the first incident of a version may wait for them.
        checks = context.release_checks.ensure(version.id, bundle)
        solver_options = (
            {"solver": influence.SolverKind.FACTORS, "factors": checks.factors, "tol": settings.factor_tol}
            if checks.factors is not None
            else {"solver": influence.SolverKind.CG, "tol": settings.tol}
        )
        report = influence.compute_influence(
            checks.loss,
            checks.params,
            bundle.train.x,
            bundle.train.y,
            x,
            true_label,
            l2=bundle.l2,
            damping=settings.damping,
            maxiter=settings.maxiter,
            batch_size=settings.batch_size,
            **solver_options,
        )
        rank_scores = ranking.normalize_scores(report.scores, settings.score, gradient_norms=checks.gradient_norms)
        sources = ranking.aggregate_by_source(report.scores, bundle.train.sources)
    except FloatingPointError as error:
        _fail(context, incident_id, claim, version.model, f"influence produced non-finite values: {error}")
        return
    except Exception as error:  # noqa: BLE001 - the job boundary: store the reason, keep going
        logger.exception("influence analysis of incident %d failed", incident_id)
        _fail(context, incident_id, claim, version.model, f"influence analysis raised {type(error).__name__}: {error}")
        return
    seconds = time.perf_counter() - started

    top = influence.top_k(rank_scores, min(settings.top_k, len(rank_scores)))
    with context.session_factory.begin() as session:
        examples = queries.training_examples_by_row(session, version.id, top.tolist())
        incident = session.get(Incident, incident_id)
        stored = queries.store_analysis(
            session,
            incident,
            worker=claim,
            suspects=[(examples[int(row)].id, float(report.scores[row]), float(rank_scores[row])) for row in top],
            iterations=report.iterations,
            residual=report.residual,
            converged=report.converged,
            negative_curvature=report.negative_curvature,
            damping=report.damping,
            seconds=seconds,
            solver=str(report.solver),
            captured=report.captured,
            reliable=report.reliable,
            score_kind=settings.score,
            source_influence=[source._asdict() for source in sources[:MAX_STORED_SOURCES]],
        )
    if not stored:
        logger.warning("incident %d: claim released or incident resolved during analysis; result discarded", incident_id)
        return
    context.metrics.influence_duration.labels(model=version.model).observe(seconds)
    if not report.reliable:
        context.metrics.influence_unconverged.labels(model=version.model).inc()
        logger.warning(
            "incident %d: %s inverse-HVP solve is unreliable (%d iterations, relative residual %.3g%s%s); "
            "its ranking is unreliable",
            incident_id,
            report.solver,
            report.iterations,
            report.residual,
            ", negative curvature: raise the damping" if report.negative_curvature else "",
            ", diverged" if report.diverged else "",
        )
    logger.info("analyzed incident %d in %.2f s", incident_id, seconds)


def _fail(context: JobContext, incident_id: int, claim: str, model: str, reason: str) -> None:
    logger.error("incident %d analysis failed: %s", incident_id, reason)
    if model in context.metrics.model_names:
        context.metrics.influence_failures.labels(model=model).inc()
    with context.session_factory.begin() as session:
        if not queries.mark_failed(session, incident_id, reason, worker=claim):
            logger.warning("incident %d: claim released or incident resolved; failure not stored", incident_id)


def evaluate_heldout(context: JobContext) -> None:
    """Evaluate each loaded model version on its held-out set and store the result."""
    for name, version_id, bundle in context.registry.items():
        predicted = heldout.predict_classes(bundle.apply, bundle.params, bundle.heldout.x)
        report = heldout.accuracy_report(predicted, np.asarray(bundle.heldout.y), bundle.num_classes)
        if not math.isfinite(report.accuracy):
            raise FloatingPointError(
                f"held-out accuracy of model {name} (version id {version_id}) is {report.accuracy} "
                f"on {report.num_examples} examples; nothing stored"
            )
        with context.session_factory.begin() as session:
            queries.record_heldout_evaluation(
                session,
                version_id,
                accuracy=report.accuracy,
                per_class_accuracy=[None if np.isnan(value) else float(value) for value in report.per_class],
                num_examples=report.num_examples,
            )
        logger.info("model %s held-out accuracy %.4f on %d examples", name, report.accuracy, report.num_examples)


def apply_retention(context: JobContext) -> dict[str, int]:
    """Delete predictions and labels past their retention period, in bounded batches; return counts.

    Each batch is its own transaction of at most ``retention.batch_size``
    rows, so the API keeps writing meanwhile. A run stops after
    ``retention.max_batches_per_run`` batches or when ``stopping`` is set.
    """
    settings = context.config.retention
    now = dt.datetime.now(dt.UTC)
    deleted = {"predictions": 0, "labels": 0}
    targets = [
        ("labels", settings.labels_days, queries.delete_expired_labels),
        ("predictions", settings.predictions_days, queries.delete_expired_predictions),
    ]
    batches = 0
    for table, days, delete_batch in targets:
        if days is None:
            continue
        cutoff = now - dt.timedelta(days=days)
        while batches < settings.max_batches_per_run and not context.stopping.is_set():
            with context.session_factory.begin() as session:
                count = delete_batch(session, received_before=cutoff, limit=settings.batch_size)
            batches += 1
            deleted[table] += count
            if count < settings.batch_size:
                break
    if deleted["predictions"] or deleted["labels"]:
        logger.info(
            "retention deleted %d predictions and %d labels in %d batches",
            deleted["predictions"],
            deleted["labels"],
            batches,
        )
    return deleted


def run_release_checks(context: JobContext) -> None:
    """Compute the missing release checks of every loaded model version before an incident needs them."""
    for name, version_id, bundle in context.registry.items():
        if context.stopping.is_set():
            return
        context.release_checks.ensure(version_id, bundle)
        logger.debug("release checks of model %s (version id %d) are complete", name, version_id)


JOBS: dict[str, Callable[[JobContext], object]] = {
    JobName.INCIDENT_SCAN: scan_incidents,
    JobName.INFLUENCE: analyze_incidents,
    JobName.HELDOUT: evaluate_heldout,
    JobName.RETENTION: apply_retention,
    JobName.RELEASE_CHECKS: run_release_checks,
}
