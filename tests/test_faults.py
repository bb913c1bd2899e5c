"""Faults: a database outage gives 503s and recovers without a restart; a failing job stops no other job."""

from __future__ import annotations

import logging
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import make_url, select
from sqlalchemy.exc import OperationalError

from detectors import heldout
from monitor import jobs
from monitor.config import Config, DatabaseConfig, ModelConfig, SchedulerConfig, ServerConfig
from monitor.daemon import Daemon
from monitor.metrics import JobName
from storage import migrations
from storage.db import create_db_engine, create_session_factory
from storage.models import Incident, IncidentState, Prediction
from tests.conftest import TOY_MODEL, toy_prediction

PASSWORD = "s3cret-pw"


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to an upstream address; :meth:`cut` drops every connection until :meth:`restore`."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self._cut = threading.Event()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._cut.is_set():
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, server]
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                target.sendall(chunk)
        except OSError:
            pass
        for end in (source, target):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        self._cut.set()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for end in sockets:
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            end.close()

    def restore(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self._listener.close()
        self._thread.join(5)


class Traffic:
    """One client thread posting batches of new predictions; records statuses and acknowledged ids."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.statuses: list[int] = []
        self.retry_after: set[str | None] = set()
        self.acknowledged: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        sequence = 0
        with httpx.Client(base_url=self.base_url, timeout=20.0) as client:
            while not self._stop.is_set():
                ids = [f"outage-{sequence}-{item}" for item in range(10)]
                sequence += 1
                try:
                    response = client.post(
                        f"/v1/models/{TOY_MODEL}/predictions", json={"predictions": [toy_prediction(i) for i in ids]}
                    )
                except httpx.TransportError as error:
                    self.errors.append(repr(error))
                    continue
                self.statuses.append(response.status_code)
                if response.status_code == 200:
                    self.acknowledged.extend(ids)
                elif response.status_code == 503:
                    self.retry_after.add(response.headers.get("retry-after"))
                time.sleep(0.05)

    def wait_for(self, status: int, timeout: float) -> bool:
        start = len(self.statuses)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if status in self.statuses[start:]:
                return True
            time.sleep(0.05)
        return False


def _wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def _toy_config(url: str, *, interval: float = 0.5) -> Config:
    return Config(
        database=DatabaseConfig(url=url),
        server=ServerConfig(port=0),
        scheduler=SchedulerConfig(
            incident_scan_interval_seconds=interval,
            influence_interval_seconds=interval,
            heldout_interval_seconds=interval,
            max_backoff_seconds=2.0,
        ),
        models=[ModelConfig(name=TOY_MODEL, loader="tests.toy_model:load")],
    )


@pytest.fixture
def proxied(postgres_url):
    """A migrated PostgreSQL database, its direct URL and a URL through a cuttable proxy (with a password)."""
    migrations.upgrade(postgres_url)
    direct = make_url(postgres_url)
    proxy = TcpProxy((direct.host or "127.0.0.1", direct.port or 5432))
    # The server trusts local connections, so the password only shows whether it leaks.
    through_proxy = direct.set(port=proxy.port, password=PASSWORD).render_as_string(hide_password=False)
    yield postgres_url, through_proxy, proxy
    proxy.close()


def test_outage_gives_503_then_recovers(proxied, caplog):
    direct_url, proxy_url, proxy = proxied
    caplog.set_level(logging.INFO)
    daemon = Daemon(_toy_config(proxy_url), registry=CollectorRegistry())
    daemon.start()
    try:
        with Traffic(daemon.base_url) as traffic, httpx.Client(base_url=daemon.base_url, timeout=20.0) as client:
            ok_before = traffic.wait_for(200, timeout=10)
            proxy.cut()
            saw_503 = traffic.wait_for(503, timeout=20)
            outage_health = client.get("/healthz")
            step_down = _wait_until(lambda: not daemon.is_leader, timeout=10)
            time.sleep(2.0)
            proxy.restore()
            recovered = traffic.wait_for(200, timeout=30)
            leader_again = _wait_until(lambda: daemon.is_leader, timeout=30)
            after_health = client.get("/healthz")
            time.sleep(0.5)
    finally:
        daemon.stop()

    engine = create_db_engine(direct_url)
    with engine.connect() as connection:
        stored = set(connection.scalars(select(Prediction.prediction_id)))
    engine.dispose()
    missing = [prediction_id for prediction_id in traffic.acknowledged if prediction_id not in stored]
    logs = "\n".join(record.getMessage() for record in caplog.records)

    assert ok_before
    assert saw_503
    assert traffic.retry_after == {"5"}
    assert outage_health.status_code == 503
    assert outage_health.json()["reason"].startswith("database unreachable: ")
    assert outage_health.headers["retry-after"] == "5"
    assert step_down
    assert recovered
    assert leader_again
    assert after_health.status_code == 200
    assert after_health.json()["scheduler"] == "running"
    assert missing == []
    assert PASSWORD not in logs
    assert PASSWORD not in outage_health.text


def test_failing_job_stops_no_other_job(migrated_url, monkeypatch, caplog):
    def broken_heldout(context):
        raise RuntimeError("held-out data missing")

    monkeypatch.setitem(jobs.JOBS, JobName.HELDOUT, broken_heldout)
    caplog.set_level(logging.ERROR, logger="monitor.scheduler")
    daemon = Daemon(_toy_config(migrated_url, interval=0.2), registry=CollectorRegistry())
    daemon.start()
    try:
        with httpx.Client(base_url=daemon.base_url) as client:
            client.post(
                f"/v1/models/{TOY_MODEL}/predictions", json={"predictions": [toy_prediction("p-1")]}
            ).raise_for_status()
            client.post(f"/v1/models/{TOY_MODEL}/labels", json={"labels": [{"prediction_id": "p-1", "label": 2}]}).raise_for_status()

            def analyzed() -> bool:
                with daemon.session_factory() as session:
                    incident = session.scalar(select(Incident))
                return incident is not None and incident.state == IncidentState.ANALYZED

            finished = _wait_until(analyzed, timeout=60)
            failures = daemon.metrics.registry.get_sample_value("poisonwatch_job_failures_total", {"job": "heldout"})
    finally:
        daemon.stop()
    assert finished
    assert failures >= 2
    assert any("job heldout scheduled for" in record.getMessage() for record in caplog.records)


def test_nan_heldout_accuracy_fails_job(migrated_url, monkeypatch):
    def nan_report(predicted, labels, num_classes):
        return heldout.AccuracyReport(accuracy=float("nan"), per_class=np.full(num_classes, np.nan), num_examples=0)

    monkeypatch.setattr(jobs.heldout, "accuracy_report", nan_report)
    daemon = Daemon(_toy_config(migrated_url), registry=CollectorRegistry())
    daemon.start(serve_http=False)
    daemon.leadership.stop()
    try:
        with pytest.raises(FloatingPointError, match=r"model toy \(version id \d+\) is nan"):
            jobs.evaluate_heldout(daemon.context)
    finally:
        daemon.stop()


def test_backoff_doubles_up_to_limit():
    now = [0.0]
    backoff = jobs.JobBackoff(max_seconds=5.0, clock=lambda: now[0])
    pauses = [backoff.failed("scan", 1.0) for _ in range(5)]
    paused_now = backoff.paused("scan")
    now[0] = 5.1
    paused_later = backoff.paused("scan")
    assert pauses == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert paused_now
    assert not paused_later


def test_unreachable_database_pauses_job(caplog):
    # Nothing listens on port 1 of the loopback address, so every connection is refused.
    engine = create_db_engine("postgresql+psycopg://postgres@127.0.0.1:1/unreachable")
    context = jobs.JobContext(
        _toy_config("sqlite://"),
        create_session_factory(engine),
        registry=None,
        metrics=None,
    )
    calls = []
    job = jobs.recorded("scan", lambda context: calls.append(1), interval_seconds=1.0)
    caplog.set_level(logging.WARNING)
    with pytest.raises(OperationalError):
        job(context)
    second = job(context)
    engine.dispose()
    assert calls == []
    assert second is jobs.JobSkipped.BACKING_OFF
    assert any("job scan: database unavailable, pausing it for 1.0 s" in r.getMessage() for r in caplog.records)
