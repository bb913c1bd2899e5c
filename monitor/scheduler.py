"""The APScheduler set-up: interval jobs from the config, in-memory job store, UTC."""

from __future__ import annotations

import datetime as dt
import logging
import time

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.background import BackgroundScheduler

from monitor.jobs import JOBS, JobContext, recorded
from monitor.metrics import JobName
from storage import queries

logger = logging.getLogger(__name__)


def _intervals(context: JobContext) -> dict[JobName, float]:
    settings = context.config.scheduler
    return {
        JobName.INCIDENT_SCAN: settings.incident_scan_interval_seconds,
        JobName.INFLUENCE: settings.influence_interval_seconds,
        JobName.HELDOUT: settings.heldout_interval_seconds,
    }


def build_scheduler(context: JobContext) -> BackgroundScheduler:
    """Create a scheduler running every job of :data:`monitor.jobs.JOBS` on its configured interval.

    Each job has ``max_instances=1`` (a slow run is never overlapped by the
    next), coalescing (runs missed while busy collapse into one) and the
    configured misfire grace time. The first run of every job is immediate.
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
    for job, seconds in _intervals(context).items():
        scheduler.add_job(
            recorded(job, JOBS[job]),
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
            context.metrics.job_last_success.labels(job=event.job_id).set(time.time())
        else:
            logger.warning("job %s scheduled for %s missed its start", event.job_id, event.scheduled_run_time.isoformat())

    return on_event


def release_unfinished_work(context: JobContext) -> None:
    """Return incidents left in ``analyzing`` by a stopped scheduler to ``open``."""
    with context.session_factory.begin() as session:
        released = queries.release_claims(session)
    if released:
        logger.info("released %d incidents left in analysis by a previous run", released)
