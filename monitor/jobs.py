"""The scheduled jobs: incident scan, influence analysis and held-out evaluation.

Each job is a plain function of a :class:`JobContext`, so tests and the CLI
can run one directly; :mod:`monitor.scheduler` runs them on intervals.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import socket
import os
import time
from collections.abc import Callable

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from detectors import heldout, influence
from monitor.config import Config
from monitor.metrics import JobName, Metrics
from monitor.registry import ModelRegistry
from storage import queries
from storage.models import Incident, JobStatus

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class JobContext:
    """The configuration, database, loaded models and metrics that every job uses."""

    config: Config
    session_factory: sessionmaker[Session]
    registry: ModelRegistry
    metrics: Metrics
    worker: str = dataclasses.field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")


def recorded(job: JobName, run: Callable[[JobContext], None]) -> Callable[[JobContext], None]:
    """Wrap a job so each run is stored in ``job_runs`` and timed; exceptions propagate."""

    def run_recorded(context: JobContext) -> None:
        with context.session_factory.begin() as session:
            run_id = queries.start_job_run(session, job).id
        started = time.perf_counter()
        try:
            run(context)
        except BaseException as error:
            with context.session_factory.begin() as session:
                queries.finish_job_run(session, run_id, status=JobStatus.FAILED, error=repr(error)[:2000])
            raise
        finally:
            context.metrics.job_duration.labels(job=job).observe(time.perf_counter() - started)
        with context.session_factory.begin() as session:
            queries.finish_job_run(session, run_id, status=JobStatus.SUCCEEDED)

    run_recorded.__name__ = f"{job}_job"
    return run_recorded


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
        with context.session_factory.begin() as session:
            incident = queries.claim_next_incident(session, worker=context.worker)
            if incident is None:
                return analyzed
            incident_id = incident.id
        analyze_incident(context, incident_id)
        analyzed += 1
    return analyzed


def analyze_incident(context: JobContext, incident_id: int) -> None:
    """Rank the training examples of one claimed incident by influence and store the top k.

    An exception from the computation is stored on the incident as its failure
    reason instead of raised, so one bad incident does not stop the others.
    """
    with context.session_factory() as session:
        incident = queries.get_incident(session, incident_id)
        version = incident.model_version
        prediction = incident.prediction
        true_label = incident.true_label
        x = np.frombuffer(prediction.input_data, dtype="<f4").reshape(prediction.input_shape)

    bundle = context.registry.bundle_for(version)
    if bundle is None:
        _fail(context, incident_id, f"model {version.model} version {version.version} is not the loaded version")
        return

    settings = context.config.influence
    started = time.perf_counter()
    try:
        report = influence.compute_influence(
            bundle.loss_fn,
            bundle.params,
            bundle.train.x,
            bundle.train.y,
            x,
            true_label,
            l2=bundle.l2,
            damping=settings.damping,
            tol=settings.tol,
            maxiter=settings.maxiter,
            batch_size=settings.batch_size,
        )
    except FloatingPointError as error:
        _fail(context, incident_id, f"influence produced non-finite values: {error}")
        return
    except Exception as error:  # noqa: BLE001 - the job boundary: store the reason, keep going
        logger.exception("influence analysis of incident %d failed", incident_id)
        _fail(context, incident_id, f"influence analysis raised {type(error).__name__}: {error}")
        return
    seconds = time.perf_counter() - started

    top = influence.top_k(report.scores, min(settings.top_k, len(report.scores)))
    with context.session_factory.begin() as session:
        examples = queries.training_examples_by_row(session, version.id, top.tolist())
        incident = session.get(Incident, incident_id)
        queries.store_analysis(
            session,
            incident,
            suspects=[(examples[int(row)].id, float(report.scores[row])) for row in top],
            iterations=report.iterations,
            residual=report.residual,
            converged=report.converged,
            negative_curvature=report.negative_curvature,
            damping=report.damping,
            seconds=seconds,
        )
    context.metrics.influence_duration.labels(model=version.model).observe(seconds)
    if not report.converged:
        context.metrics.influence_unconverged.labels(model=version.model).inc()
        logger.warning(
            "incident %d: inverse-HVP did not converge (%d iterations, relative residual %.3g%s); "
            "its ranking is unreliable",
            incident_id,
            report.iterations,
            report.residual,
            ", negative curvature: raise the damping" if report.negative_curvature else "",
        )
    logger.info("analyzed incident %d in %.2f s", incident_id, seconds)


def _fail(context: JobContext, incident_id: int, reason: str) -> None:
    logger.error("incident %d analysis failed: %s", incident_id, reason)
    with context.session_factory.begin() as session:
        queries.mark_failed(session, incident_id, reason)


def evaluate_heldout(context: JobContext) -> None:
    """Evaluate each loaded model version on its held-out set and store the result."""
    for name, version_id, bundle in context.registry.items():
        predicted = heldout.predict_classes(bundle.apply, bundle.params, bundle.heldout.x)
        report = heldout.accuracy_report(predicted, np.asarray(bundle.heldout.y), bundle.num_classes)
        with context.session_factory.begin() as session:
            queries.record_heldout_evaluation(
                session,
                version_id,
                accuracy=report.accuracy,
                per_class_accuracy=[None if np.isnan(value) else float(value) for value in report.per_class],
                num_examples=report.num_examples,
            )
        logger.info("model %s held-out accuracy %.4f on %d examples", name, report.accuracy, report.num_examples)


JOBS: dict[JobName, Callable[[JobContext], object]] = {
    JobName.INCIDENT_SCAN: scan_incidents,
    JobName.INFLUENCE: analyze_incidents,
    JobName.HELDOUT: evaluate_heldout,
}
