"""Every Prometheus metric poisonwatch exports, defined in this one module.

Label values come only from bounded sets: model names from the configuration,
job names and rejection reasons from the enums below, incident states from
:class:`storage.models.IncidentState`. Request data never becomes a label.

Values derived from stored results (incidents by state, the latest held-out
accuracy) are read from the database by :class:`StoredResultsCollector` at
scrape time, so every API process reports the same numbers.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from storage import queries
from storage.models import IncidentState

logger = logging.getLogger(__name__)

PREFIX = "poisonwatch"


class JobName(enum.StrEnum):
    INCIDENT_SCAN = "incident_scan"
    INFLUENCE = "influence"
    HELDOUT = "heldout"


class RejectReason(enum.StrEnum):
    """Reason the API rejected a request, used as the ``reason`` label of the rejection counter."""

    MALFORMED = "malformed"
    INVALID_FIELD = "invalid_field"
    UNKNOWN_MODEL = "unknown_model"
    UNKNOWN_VERSION = "unknown_version"
    WRONG_SHAPE = "wrong_shape"
    OVERSIZE_BATCH = "oversize_batch"
    CONFLICT = "conflict"
    UNKNOWN_PREDICTION = "unknown_prediction"


class Endpoint(enum.StrEnum):
    PREDICTIONS = "predictions"
    LABELS = "labels"


class Metrics:
    """The daemon's metric objects, registered in ``registry`` with series pre-created at zero.

    With a ``session_factory``, the gauges of :class:`StoredResultsCollector`
    are registered too.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        models: Sequence[str],
        session_factory: Callable[[], Session] | None = None,
    ) -> None:
        self.registry = registry
        if session_factory is not None:
            registry.register(StoredResultsCollector(session_factory, models))
        self.build_info = Info(f"{PREFIX}_build", "poisonwatch version and JAX runtime.", registry=registry)
        self.predictions_ingested = Counter(
            f"{PREFIX}_predictions_ingested_total",
            "Predictions stored through the API (repeats of a stored prediction not counted).",
            ["model"],
            registry=registry,
        )
        self.labels_ingested = Counter(
            f"{PREFIX}_labels_ingested_total",
            "Ground-truth labels stored through the API.",
            ["model"],
            registry=registry,
        )
        self.requests_rejected = Counter(
            f"{PREFIX}_requests_rejected_total",
            "Write requests rejected with a 4xx status, by endpoint and reason.",
            ["endpoint", "reason"],
            registry=registry,
        )
        self.incidents_opened = Counter(
            f"{PREFIX}_incidents_opened_total",
            "Incidents opened for unexpected high-confidence misclassifications.",
            ["model"],
            registry=registry,
        )
        self.influence_duration = Histogram(
            f"{PREFIX}_influence_duration_seconds",
            "Wall time of one incident's influence analysis, model loading excluded.",
            ["model"],
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=registry,
        )
        self.influence_unconverged = Counter(
            f"{PREFIX}_influence_unconverged_solves_total",
            "Inverse-HVP solves that stopped before reaching their tolerance.",
            ["model"],
            registry=registry,
        )
        self.job_duration = Histogram(
            f"{PREFIX}_job_duration_seconds",
            "Wall time of one scheduled job run.",
            ["job"],
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900),
            registry=registry,
        )
        self.job_failures = Counter(
            f"{PREFIX}_job_failures_total",
            "Scheduled job runs that raised an exception.",
            ["job"],
            registry=registry,
        )
        self.job_last_success = Gauge(
            f"{PREFIX}_job_last_success_timestamp_seconds",
            "Unix time of the last successful run of each job; 0 until one succeeds.",
            ["job"],
            registry=registry,
        )
        self.http_request_duration = Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "Wall time of HTTP requests, by route template, method and status class.",
            ["route", "method", "status"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        for job in JobName:
            self.job_duration.labels(job=job)
            self.job_failures.labels(job=job)
            self.job_last_success.labels(job=job)
        for endpoint in Endpoint:
            for reason in RejectReason:
                self.requests_rejected.labels(endpoint=endpoint, reason=reason)
        for model in models:
            self.predictions_ingested.labels(model=model)
            self.labels_ingested.labels(model=model)
            self.incidents_opened.labels(model=model)
            self.influence_unconverged.labels(model=model)


class StoredResultsCollector(Collector):
    """Yields gauges computed from the database at scrape time.

    A failed query yields ``poisonwatch_stored_results_up 0`` and no other
    family, so a dashboard shows missing data instead of stale numbers.
    """

    def __init__(self, session_factory: Callable[[], Session], models: Sequence[str]) -> None:
        self._session_factory = session_factory
        self._models = list(models)

    def describe(self) -> Iterable[Metric]:
        # Describing without querying keeps registration free of database access.
        return []

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(f"{PREFIX}_stored_results_up", "1 if the last scrape could read stored results, else 0.")
        try:
            with self._session_factory() as session:
                counts = queries.incident_counts(session)
                heldout = queries.latest_heldout_evaluations(session)
        except SQLAlchemyError:
            logger.warning("scrape could not read stored results", exc_info=True)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        incidents = GaugeMetricFamily(f"{PREFIX}_incidents", "Incidents in the database, by model and state.", labels=["model", "state"])
        by_key = {(model, state): count for model, state, count in counts}
        for model in self._models:
            for state in IncidentState:
                incidents.add_metric([model, state.value], by_key.get((model, state), 0))
        yield incidents

        accuracy = GaugeMetricFamily(
            f"{PREFIX}_heldout_accuracy_ratio",
            "Latest held-out accuracy of each model's current version, from 0 to 1.",
            labels=["model", "version"],
        )
        for version, evaluation in heldout:
            if version.model in self._models:
                accuracy.add_metric([version.model, version.version], evaluation.accuracy)
        yield accuracy
