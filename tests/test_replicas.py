"""Replicas: several serve processes share one database; one leader runs the jobs, another takes over."""

from __future__ import annotations

import time
from collections import Counter

import httpx
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import select

from monitor.config import Config, DatabaseConfig, ModelConfig, SchedulerConfig, ServerConfig
from monitor.daemon import Daemon
from monitor.errors import SchedulerLockedError
from storage import migrations
from storage.db import create_db_engine
from storage.models import JobRun
from tests.conftest import TOY_MODEL, ServeProcess, free_port, toy_prediction, write_toy_config

INTERVAL = 1.0


def _job_runs(url: str) -> list[JobRun]:
    engine = create_db_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(select(JobRun.job, JobRun.scheduled_for, JobRun.runner, JobRun.started_at)).all()
    engine.dispose()
    return rows


def _wait_for_role(server: ServeProcess, role: str, timeout: float) -> float | None:
    """Poll ``/healthz`` until the scheduler role is ``role``; return the seconds it took, or None."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if server.health().get("scheduler") == role:
            return time.monotonic() - started
        time.sleep(0.05)
    return None


def test_one_leader_and_takeover(postgres_url, tmp_path):
    migrations.upgrade(postgres_url)
    servers = [
        ServeProcess(
            write_toy_config(tmp_path / f"replica-{name}.toml", postgres_url, free_port(), interval=INTERVAL),
            tmp_path / f"replica-{name}.log",
        )
        for name in ("a", "b")
    ]
    try:
        for server in servers:
            server.start()
        time.sleep(3 * INTERVAL)
        roles = {server.health()["scheduler"]: server for server in servers}
        writes = [
            httpx.post(
                f"{server.base_url}/v1/models/{TOY_MODEL}/predictions",
                json={"predictions": [toy_prediction(f"via-{server.port}")]},
                timeout=10,
            ).status_code
            for server in servers
        ]
        leader, standby = roles.get("running"), roles.get("standby")
        assert leader is not None and standby is not None, roles
        leader_runner_suffix = f":{leader.process.pid}"
        standby_runner_suffix = f":{standby.process.pid}"

        killed_at = time.time()
        leader.kill()
        takeover_seconds = _wait_for_role(standby, "running", timeout=10 * INTERVAL)
        time.sleep(3 * INTERVAL)
        runs = _job_runs(postgres_url)
    finally:
        for server in servers:
            server.kill()

    slots = Counter((run.job, run.scheduled_for) for run in runs)
    before_kill = {run.runner for run in runs if run.started_at.timestamp() < killed_at}
    after_kill = {run.runner for run in runs if run.started_at.timestamp() > killed_at}
    assert writes == [200, 200]
    assert max(slots.values()) == 1
    assert len(before_kill) == 1
    assert before_kill.pop().endswith(leader_runner_suffix)
    assert len(after_kill) == 1
    assert after_kill.pop().endswith(standby_runner_suffix)
    assert takeover_seconds is not None
    assert takeover_seconds <= 2 * INTERVAL


def _sqlite_daemon(url: str) -> Daemon:
    config = Config(
        database=DatabaseConfig(url=url),
        server=ServerConfig(port=0),
        scheduler=SchedulerConfig(incident_scan_interval_seconds=5, influence_interval_seconds=5),
        models=[ModelConfig(name=TOY_MODEL, loader="tests.toy_model:load")],
    )
    return Daemon(config, registry=CollectorRegistry())


def test_sqlite_second_scheduler_rejected(migrated_url):
    first = _sqlite_daemon(migrated_url)
    first.start(serve_http=False)
    second = _sqlite_daemon(migrated_url)
    try:
        with pytest.raises(SchedulerLockedError, match=r"another poisonwatch scheduler already runs .* held by process \d+"):
            second.start(serve_http=False)
    finally:
        second.stop()
        first.stop()
    assert first.leadership is not None
    assert not first.is_leader


def test_sqlite_scheduler_lock_freed_on_stop(migrated_url):
    first = _sqlite_daemon(migrated_url)
    first.start(serve_http=False)
    first.stop()
    second = _sqlite_daemon(migrated_url)
    second.start(serve_http=False)
    try:
        leads = second.is_leader
    finally:
        second.stop()
    assert leads
