"""Crash safety: acknowledged writes survive SIGKILL, claims resume after a restart, SIGTERM stops cleanly."""

from __future__ import annotations

import random
import threading
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import select

from monitor.config import Config, DatabaseConfig, ModelConfig, SchedulerConfig, ServerConfig
from monitor.daemon import Daemon
from storage import migrations, queries
from storage.db import create_db_engine, create_session_factory
from storage.models import Incident, IncidentState, Prediction
from tests.conftest import TOY_MODEL, ServeProcess, free_port, toy_prediction, write_toy_config

KILLS = 3
BATCH = 20
CLIENT_THREADS = 2


class Ingestor:
    """Client threads that post batches of new predictions and record every id acknowledged with 200."""

    def __init__(self, base_url: str, prefix: str) -> None:
        self.base_url = base_url
        self.prefix = prefix
        self.acknowledged: list[str] = []
        self.requests = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._post, args=(index,), daemon=True) for index in range(CLIENT_THREADS)]

    def __enter__(self) -> Ingestor:
        for thread in self._threads:
            thread.start()
        return self

    def wait_for_first_acknowledgement(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self.acknowledged:
                    return
            time.sleep(0.05)

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _post(self, index: int) -> None:
        sequence = 0
        with httpx.Client(base_url=self.base_url, timeout=10.0) as client:
            while not self._stop.is_set():
                ids = [f"{self.prefix}-{index}-{sequence}-{item}" for item in range(BATCH)]
                sequence += 1
                body = {"predictions": [toy_prediction(prediction_id) for prediction_id in ids]}
                try:
                    response = client.post(f"/v1/models/{TOY_MODEL}/predictions", json=body)
                except httpx.TransportError:
                    # The server died mid-request: this batch was never acknowledged.
                    return
                with self._lock:
                    self.requests += 1
                    if response.status_code == 200:
                        self.acknowledged.extend(ids)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_sigkill_keeps_acknowledged_predictions(backend, tmp_path, request):
    url = f"sqlite:///{tmp_path / 'crash.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    migrations.upgrade(url)
    config = write_toy_config(tmp_path / "poisonwatch.toml", url, free_port())
    rng = random.Random(20270111)
    acknowledged: list[str] = []

    for round_index in range(KILLS):
        server = ServeProcess(config, tmp_path / "serve.log").start()
        with Ingestor(server.base_url, prefix=f"round{round_index}") as ingestor:
            # Kill at a random point after traffic is flowing: on a loaded machine
            # the first batch alone can take longer than the random delay.
            ingestor.wait_for_first_acknowledgement(timeout=60)
            time.sleep(rng.uniform(0.5, 2.0))
            server.kill()
        assert ingestor.requests > 0, server.log_tail()
        acknowledged.extend(ingestor.acknowledged)

    survivor = ServeProcess(config, tmp_path / "serve.log").start()
    health = survivor.health()
    exit_code = survivor.terminate()

    engine = create_db_engine(url)
    with engine.connect() as connection:
        stored = set(connection.scalars(select(Prediction.prediction_id)))
    engine.dispose()
    missing = [prediction_id for prediction_id in acknowledged if prediction_id not in stored]
    assert len(acknowledged) >= KILLS * BATCH
    assert missing == []
    assert health["status"] == "ok"
    assert exit_code == 0


def _toy_daemon_config(url: str) -> Config:
    return Config(
        database=DatabaseConfig(url=url),
        server=ServerConfig(port=0),
        scheduler=SchedulerConfig(incident_scan_interval_seconds=0.2, influence_interval_seconds=0.2),
        models=[ModelConfig(name=TOY_MODEL, loader="tests.toy_model:load")],
    )


def _seed_claimed_incident(url: str, worker: str) -> int:
    """Store a labelled misclassification and claim its incident as a process that then died."""
    engine = create_db_engine(url)
    session_factory = create_session_factory(engine)
    daemon = Daemon(_toy_daemon_config(url).model_copy(update={"scheduler": SchedulerConfig(enabled=False)}))
    daemon.start(serve_http=False)
    daemon.stop()
    with session_factory.begin() as session:
        version = queries.current_versions(session)[TOY_MODEL]
        record = queries.PredictionRecord(
            prediction_id="p-crash",
            model_version_id=version.id,
            predicted_class=0,
            confidence=0.97,
            probabilities=None,
            input_shape=[2, 2],
            input_data=bytes(16),
            content_digest="d",
            predicted_at=queries.utcnow(),
        )
        queries.insert_predictions(session, TOY_MODEL, [record])
        queries.insert_labels(session, TOY_MODEL, [("p-crash", 2)])
        queries.open_misclassification_incidents(session, confidence_threshold=0.9)
    with session_factory.begin() as session:
        incident_id = queries.claim_next_incident(session, worker=worker).id
    engine.dispose()
    return incident_id


def test_restart_resumes_claimed_incident(migrated_url):
    incident_id = _seed_claimed_incident(migrated_url, worker="crashed-host:1")
    daemon = Daemon(_toy_daemon_config(migrated_url), registry=CollectorRegistry())
    daemon.start(serve_http=False)
    try:
        deadline = time.monotonic() + 60
        state = None
        while time.monotonic() < deadline and state != IncidentState.ANALYZED:
            with daemon.session_factory() as session:
                state = session.get(Incident, incident_id).state
            time.sleep(0.1)
        with daemon.session_factory() as session:
            incident = session.get(Incident, incident_id)
    finally:
        daemon.stop()
    assert state == IncidentState.ANALYZED
    assert incident.attempts == 2
    assert incident.claimed_by is None


def test_stop_leaves_no_claim_behind(migrated_url):
    _seed_claimed_incident(migrated_url, worker="crashed-host:1")
    daemon = Daemon(_toy_daemon_config(migrated_url), registry=CollectorRegistry())
    daemon.start(serve_http=False)
    daemon.stop()
    engine = create_db_engine(migrated_url)
    with create_session_factory(engine)() as session:
        analyzing = session.scalars(select(Incident).where(Incident.state == IncidentState.ANALYZING)).all()
    engine.dispose()
    assert analyzing == []
