"""The APScheduler set-up and scheduler leadership.

Jobs run on intervals from the config, from an in-memory job store, in UTC.
Only the process that holds the scheduler lock (:mod:`storage.locks`) runs
them. On PostgreSQL the other replicas wait as standbys and take over when
the leader's lock goes. On SQLite a second scheduler is rejected at start.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.background import BackgroundScheduler

from monitor.errors import SchedulerLockedError
from monitor.jobs import JOBS, JobContext, JobSkipped, recorded
from monitor.metrics import JobName, job_intervals
from storage import queries
from storage.locks import SchedulerLock, SqliteFileLock

logger = logging.getLogger(__name__)


def _intervals(context: JobContext) -> dict[JobName, float]:
    retention = context.config.retention
    enabled = retention.predictions_days is not None or retention.labels_days is not None
    return job_intervals(context.config.scheduler, retention_enabled=enabled)


def build_scheduler(context: JobContext) -> BackgroundScheduler:
    """Create a scheduler running every job of :data:`monitor.jobs.JOBS` on its configured interval.

    Each job has ``max_instances=1`` (a slow run is never overlapped by the
    next), coalescing (runs missed while busy collapse into one) and the
    configured misfire grace time. The first run of every job is immediate.
    Each run claims its interval slot in ``job_runs`` (see
    :func:`monitor.jobs.recorded`), so two schedulers never run a job twice
    for the same slot.
    """
    settings = context.config.scheduler
    scheduler = BackgroundScheduler(
        jobstores={"default": MemoryJobStore()},
        executors={"default": ThreadPoolExecutor(max_workers=settings.workers)},
        job_defaults={
            "max_instances": 1,
            "coalesce": True,
            "misfire_grace_time": int(settings.misfire_grace_seconds),
        },
        timezone=dt.UTC,
    )
    now = dt.datetime.now(dt.UTC)
    intervals = _intervals(context)
    # The job-overdue alert compares each job's last success with its interval.
    context.metrics.record_job_intervals(intervals)
    for job, seconds in intervals.items():
        scheduler.add_job(
            recorded(job, JOBS[job], interval_seconds=seconds),
            "interval",
            seconds=seconds,
            args=[context],
            id=job.value,
            name=job.value,
            next_run_time=now,
        )
    scheduler.add_listener(_listener(context), EVENT_JOB_ERROR | EVENT_JOB_EXECUTED | EVENT_JOB_MISSED)
    return scheduler


def _listener(context: JobContext):
    def on_event(event: JobExecutionEvent) -> None:
        if event.code == EVENT_JOB_ERROR:
            context.metrics.job_failures.labels(job=event.job_id).inc()
            logger.error(
                "job %s scheduled for %s failed",
                event.job_id,
                event.scheduled_run_time.isoformat(),
                exc_info=(type(event.exception), event.exception, event.exception.__traceback__),
            )
        elif event.code == EVENT_JOB_EXECUTED:
            if not isinstance(event.retval, JobSkipped):
                context.metrics.job_last_success.labels(job=event.job_id).set(time.time())
        else:
            logger.warning("job %s scheduled for %s missed its start", event.job_id, event.scheduled_run_time.isoformat())

    return on_event


def release_unfinished_work(context: JobContext) -> None:
    """Return incidents left in ``analyzing`` by a stopped scheduler to ``open``.

    Safe only in the process that holds the scheduler lock: no other process
    analyzes then. A former leader that is still computing finds its claim
    gone and discards its result (see :func:`storage.queries.store_analysis`).
    """
    with context.session_factory.begin() as session:
        released = queries.release_claims(session)
    if released:
        logger.info("released %d incidents left in analysis by a previous run", released)


class SchedulerLeadership:
    """Runs the scheduler in this process only while it holds the scheduler lock.

    :meth:`start` takes the lock if it is free. On SQLite a held lock raises
    :class:`SchedulerLockedError`. On PostgreSQL this process becomes a
    standby, and a background thread tries the lock again every
    ``scheduler.leader_check_seconds``. The leader checks its lock as often
    and stops its scheduler when the lock is lost, for example when the
    database connection breaks. It takes the lock again once the database is
    back. ``on_change(is_leader)`` is called on each change.
    """

    def __init__(self, context: JobContext, lock: SchedulerLock, on_change: Callable[[bool], None]) -> None:
        self._context = context
        self._lock = lock
        self._on_change = on_change
        self._check_seconds = context.config.scheduler.effective_leader_check_seconds
        self._scheduler: BackgroundScheduler | None = None
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    @property
    def is_leader(self) -> bool:
        return self._scheduler is not None

    def start(self) -> None:
        acquired = self._lock.try_acquire()
        if not acquired and isinstance(self._lock, SqliteFileLock):
            raise SchedulerLockedError(self._lock.holder())
        if acquired:
            self._become_leader()
        else:
            logger.info("scheduler standby: another replica holds the scheduler lock; checking every %.1f s", self._check_seconds)
        self._thread = threading.Thread(target=self._watch, name="poisonwatch-leadership", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._closed.wait(self._check_seconds):
            with self._mutex:
                if self._closed.is_set():
                    return
                if self.is_leader:
                    if not self._lock.is_held():
                        self._step_down()
                elif self._lock.try_acquire():
                    self._become_leader()

    def _become_leader(self) -> None:
        try:
            release_unfinished_work(self._context)
        except Exception as error:  # noqa: BLE001 - stay standby and retry at the next check
            logger.warning("could not release unfinished work (%s); giving the scheduler lock back", type(error).__name__)
            self._lock.release()
            return
        self._context.stopping.clear()
        self._scheduler = build_scheduler(self._context)
        self._scheduler.start()
        logger.info("this replica (%s) now runs the scheduler", self._context.worker)
        self._on_change(True)

    def _step_down(self) -> None:
        logger.warning("scheduler lock lost; stopping the scheduler until the lock can be taken again")
        self._context.stopping.set()
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None and scheduler.running:
            # Running jobs finish in the background; their results are
            # discarded when the new leader has released their claims.
            scheduler.shutdown(wait=False)
        self._on_change(False)

    def stop(self) -> None:
        """Stop the watcher, finish running jobs, release this process's claims and give the lock up."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join(self._check_seconds + 5)
        with self._mutex:
            self._context.stopping.set()
            scheduler, self._scheduler = self._scheduler, None
            if scheduler is not None and scheduler.running:
                scheduler.shutdown(wait=True)
                self._release_own_claims()
                self._on_change(False)
            self._lock.release()

    def _release_own_claims(self) -> None:
        try:
            with self._context.session_factory.begin() as session:
                released = queries.release_claims(session, worker=self._context.worker)
        except Exception as error:  # noqa: BLE001 - shutting down; the next leader releases them
            logger.warning("could not release this process's claims on shutdown (%s)", type(error).__name__)
            return
        if released:
            logger.info("released %d incidents claimed by this process", released)
