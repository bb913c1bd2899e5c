"""Every Prometheus metric poisonwatch exports, defined in this one module.

Label values come only from bounded sets: model names from the configuration,
job names and rejection reasons from the enums below, incident states from
:class:`storage.models.IncidentState`. Request data never becomes a label.

Values derived from stored results (incidents by state, the latest held-out
accuracy overall and per class) are read from the database by
:class:`StoredResultsCollector` at scrape time, so every API process reports
the same numbers.

With several API worker processes (``monitor.asgi``), prometheus_client runs
in multiprocess mode. Counters and histograms are then summed over the files
that each worker writes under ``PROMETHEUS_MULTIPROC_DIR``. The files of
workers that have died count too, so a counter does not drop when a worker is
replaced.
docs/metrics.md lists every metric with its type, unit, labels and meaning.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from monitor.config import SchedulerConfig
from storage import queries
from storage.models import HeldOutEvaluation, IncidentState, ModelVersion

logger = logging.getLogger(__name__)

PREFIX = "poisonwatch"

# Upper bound on the ``class`` label of per-class gauges: a model with more
# classes exports its first MAX_CLASS_LABELS classes only, so one model can
# add at most this many series per version.
MAX_CLASS_LABELS = 100


class JobName(enum.StrEnum):
    INCIDENT_SCAN = "incident_scan"
    INFLUENCE = "influence"
    HELDOUT = "heldout"
    RETENTION = "retention"
    RELEASE_CHECKS = "release_checks"


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


def job_intervals(settings: SchedulerConfig, *, retention_enabled: bool = False) -> dict[JobName, float]:
    """Return the configured interval of every scheduled job, in seconds.

    The retention job is scheduled, and so listed, only when a retention
    period is configured.
    """
    intervals = {
        JobName.INCIDENT_SCAN: settings.incident_scan_interval_seconds,
        JobName.INFLUENCE: settings.influence_interval_seconds,
        JobName.HELDOUT: settings.heldout_interval_seconds,
        JobName.RELEASE_CHECKS: settings.release_check_interval_seconds,
    }
    if retention_enabled:
        intervals[JobName.RETENTION] = settings.retention_interval_seconds
    return intervals


class Metrics:
    """The daemon's metric objects, registered in ``registry`` with series pre-created at zero.

    With a ``session_factory``, the gauges of :class:`StoredResultsCollector`
    are exported too. With ``multiprocess_dir`` (the directory named by
    ``PROMETHEUS_MULTIPROC_DIR``, set before prometheus_client is imported),
    :meth:`exposition` sums the values written by every worker process.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        models: Sequence[str],
        session_factory: Callable[[], Session] | None = None,
        *,
        multiprocess_dir: str | Path | None = None,
    ) -> None:
        self.registry = registry
        # Only configured model names become label values; anything else is dropped.
        self.model_names = frozenset(models)
        stored_results = None if session_factory is None else StoredResultsCollector(session_factory, models)
        if multiprocess_dir is None:
            self.exposed_registry = registry
            if stored_results is not None:
                registry.register(stored_results)
        else:
            # The in-process values of ``registry`` are only this worker's share,
            # so a scrape reads every worker's files instead.
            self.exposed_registry = CollectorRegistry()
            MultiProcessCollector(self.exposed_registry, path=str(multiprocess_dir))
            self.exposed_registry.register(BuildInfoCollector(jax_initialised=False))
            if stored_results is not None:
                self.exposed_registry.register(stored_results)
        self._define(registry)
        self._preinitialise(models)

    def _define(self, registry: CollectorRegistry) -> None:
        self.build_info = Info(
            f"{PREFIX}_build",
            "poisonwatch version, JAX version, JAX backend and number of JAX devices; the value is always 1.",
            registry=registry,
        )
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
        self.influence_failures = Counter(
            f"{PREFIX}_influence_failures_total",
            "Influence analyses that ended in the failed state (non-finite values, an exception, a model not loaded).",
            ["model"],
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
        # "max" over worker processes: only the process that runs the
        # scheduler sets these; API-only workers keep the pre-created zero.
        self.job_last_success = Gauge(
            f"{PREFIX}_job_last_success_timestamp_seconds",
            "Unix time of the last successful run of each job; 0 until one succeeds.",
            ["job"],
            multiprocess_mode="max",
            registry=registry,
        )
        self.job_interval = Gauge(
            f"{PREFIX}_job_interval_seconds",
            "Configured interval of each scheduled job; exported only by a process whose scheduler runs.",
            ["job"],
            multiprocess_mode="max",
            registry=registry,
        )
        self.http_request_duration = Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "Wall time of HTTP requests, by route template, method and status class.",
            ["route", "method", "status"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )

    def _preinitialise(self, models: Sequence[str]) -> None:
        # A counter that appears only at its first increment hides the first
        # event from rate() and increase(), so every bounded series starts at 0.
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
            self.influence_failures.labels(model=model)
            self.influence_duration.labels(model=model)

    def record_job_intervals(self, intervals: Mapping[JobName, float]) -> None:
        """Export the interval of each scheduled job, which the job-overdue alert compares against."""
        for job, seconds in intervals.items():
            self.job_interval.labels(job=job).set(seconds)

    def exposition(self) -> bytes:
        """Render every exported metric in the Prometheus text format."""
        return generate_latest(self.exposed_registry)


def build_info_labels(*, jax_initialised: bool = True) -> dict[str, str]:
    """Return the labels of ``poisonwatch_build_info`` for this process.

    A process that never runs JAX (an API-only worker) passes
    ``jax_initialised=False`` and reports backend ``none`` with 0 devices,
    because asking JAX for its backend would claim the accelerator.
    """
    labels = {"version": metadata.version("poisonwatch"), "jax_version": metadata.version("jax")}
    if not jax_initialised:
        return labels | {"backend": "none", "devices": "0"}

    import jax

    return labels | {"backend": jax.default_backend(), "devices": str(jax.device_count())}


class BuildInfoCollector(Collector):
    """Yields ``poisonwatch_build_info`` from fixed labels, for registries without an ``Info`` metric."""

    def __init__(self, *, jax_initialised: bool) -> None:
        self._labels = build_info_labels(jax_initialised=jax_initialised)

    def collect(self) -> Iterable[Metric]:
        info = GaugeMetricFamily(
            f"{PREFIX}_build_info",
            "poisonwatch version, JAX version, JAX backend and number of JAX devices; the value is always 1.",
            labels=sorted(self._labels),
        )
        info.add_metric([self._labels[name] for name in sorted(self._labels)], 1)
        yield info


class StoredResultsCollector(Collector):
    """Yields gauges computed from the database at scrape time.

    A failed query yields ``poisonwatch_stored_results_up 0`` and no other
    family, so a dashboard shows missing data instead of stale numbers.
    """

    def __init__(self, session_factory: Callable[[], Session], models: Sequence[str]) -> None:
        self._session_factory = session_factory
        self._models = list(models)
        self._truncated: set[tuple[str, str]] = set()

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
        yield self._incidents(counts)
        yield from self._heldout(heldout)

    def _incidents(self, counts: Sequence[tuple[str, IncidentState, int]]) -> Metric:
        incidents = GaugeMetricFamily(f"{PREFIX}_incidents", "Incidents in the database, by model and state.", labels=["model", "state"])
        by_key = {(model, state): count for model, state, count in counts}
        for model in self._models:
            for state in IncidentState:
                incidents.add_metric([model, state.value], by_key.get((model, state), 0))
        return incidents

    def _heldout(self, heldout: Sequence[tuple[ModelVersion, HeldOutEvaluation]]) -> Iterable[Metric]:
        accuracy = GaugeMetricFamily(
            f"{PREFIX}_heldout_accuracy_ratio",
            "Latest held-out accuracy of each model's current version, from 0 to 1.",
            labels=["model", "version"],
        )
        per_class = GaugeMetricFamily(
            f"{PREFIX}_heldout_class_accuracy_ratio",
            f"Latest held-out accuracy of each class of each model's current version, from 0 to 1; "
            f"classes without held-out examples and classes from index {MAX_CLASS_LABELS} on are left out.",
            labels=["model", "version", "class"],
        )
        for version, evaluation in heldout:
            if version.model not in self._models:
                continue
            accuracy.add_metric([version.model, version.version], evaluation.accuracy)
            classes = evaluation.per_class_accuracy or []
            if len(classes) > MAX_CLASS_LABELS and (version.model, version.version) not in self._truncated:
                # Logged once per model version, not on every scrape.
                self._truncated.add((version.model, version.version))
                logger.warning(
                    "model %s version %s has %d classes; exporting per-class accuracy of the first %d only",
                    version.model, version.version, len(classes), MAX_CLASS_LABELS,
                )
            for index, value in enumerate(classes[:MAX_CLASS_LABELS]):
                if value is not None:
                    per_class.add_metric([version.model, version.version, str(index)], value)
        yield accuracy
        yield per_class
