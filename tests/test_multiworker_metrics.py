"""Counters of the API served by four uvicorn workers: summed, monotonic, bounded.

1,000 predictions over 2 models x 10 classes, each with its own id, go to
``uvicorn --workers 4`` running ``monitor.asgi``; /metrics is scraped 20 times
and one worker is killed half way.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from storage import migrations, queries
from storage.db import create_db_engine, create_session_factory

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("alpha", "beta")
NUM_CLASSES = 10
WORKERS = 4
PREDICTIONS = 1000
BATCH = 10
SCRAPES = 20
INGESTED = "poisonwatch_predictions_ingested_total"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def register_models(url: str) -> None:
    engine = create_db_engine(url)
    with create_session_factory(engine).begin() as session:
        for model in MODELS:
            queries.register_model_version(
                session,
                model=model,
                version="v1",
                loader="unused.module:load",
                input_shape=(4,),
                num_classes=NUM_CLASSES,
                manifest=[],
            )
    engine.dispose()


def worker_pids(master: int) -> list[int]:
    """Return the uvicorn worker processes among ``master``'s children."""
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    workers = []
    for pid in children:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except FileNotFoundError:
            continue
        if b"resource_tracker" not in command:
            workers.append(int(pid))
    return workers


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    url = f"sqlite:///{tmp_path / 'poisonwatch.db'}"
    migrations.upgrade(url)
    register_models(url)
    config = tmp_path / "poisonwatch.toml"
    models = "".join(f'[[models]]\nname = "{model}"\nloader = "unused.module:load"\n\n' for model in MODELS)
    config.write_text(f'[database]\nurl = "{url}"\n\n{models}')
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    port = free_port()
    environment = os.environ | {"POISONWATCH_CONFIG": str(config), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    command = [
        sys.executable, "-m", "uvicorn", "--factory", "monitor.asgi:create_app",
        "--workers", str(WORKERS), "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
    ]
    process = subprocess.Popen(command, cwd=ROOT, env=environment)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert process.poll() is None, "uvicorn exited during start-up"
            try:
                ready = httpx.get(f"{base_url}/healthz").status_code == 200
            except httpx.TransportError:
                ready = False
            if ready and len(worker_pids(process.pid)) == WORKERS:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"uvicorn with {WORKERS} workers did not become ready within 60 s")
        yield base_url, process, metrics_dir
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def prediction_batch(start: int) -> tuple[str, dict]:
    model = MODELS[(start // BATCH) % len(MODELS)]
    predictions = []
    for number in range(start, start + BATCH):
        predicted = number % NUM_CLASSES
        probabilities = [0.01] * NUM_CLASSES
        probabilities[predicted] = 1 - 0.01 * (NUM_CLASSES - 1)
        predictions.append(
            {
                "prediction_id": f"pred-{number:05d}",
                "predicted_class": predicted,
                "probabilities": probabilities,
                "input": {"shape": [4], "data": [0.1, 0.2, 0.3, float(number)]},
            }
        )
    return model, {"predictions": predictions}


def ingested_series(base_url: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = httpx.get(f"{base_url}/metrics").text
    series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == INGESTED:
                series[tuple(sorted(sample.labels.items()))] = sample.value
    return series


def test_counter_sums_workers(server):
    base_url, process, metrics_dir = server
    totals = []
    series_counts = []
    label_sets = set()
    requests_per_scrape = PREDICTIONS // BATCH // SCRAPES
    killed = None
    for request_number, start in enumerate(range(0, PREDICTIONS, BATCH), start=1):
        model, body = prediction_batch(start)
        # A new connection per request lets the kernel hand requests to different workers.
        response = httpx.post(f"{base_url}/v1/models/{model}/predictions", json=body, timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["accepted"] == BATCH
        if request_number % requests_per_scrape == 0:
            series = ingested_series(base_url)
            totals.append(sum(series.values()))
            series_counts.append(len(series))
            label_sets.update(series)
        if request_number == PREDICTIONS // BATCH // 2:
            killed = worker_pids(process.pid)[0]
            os.kill(killed, signal.SIGKILL)
            after_kill = sum(ingested_series(base_url).values())

    writers = {path.stem.rsplit("_", 1)[-1] for path in metrics_dir.glob("counter_*.db")}
    assert len(totals) == SCRAPES
    assert totals[-1] == PREDICTIONS
    assert totals == sorted(totals)
    assert killed is not None
    assert after_kill >= totals[SCRAPES // 2 - 1]
    assert len(writers) >= 2
    assert max(series_counts) <= len(MODELS) * NUM_CLASSES
    assert {labels for labels in label_sets} == {(("model", model),) for model in MODELS}
