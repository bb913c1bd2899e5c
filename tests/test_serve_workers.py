"""``poisonwatch serve --workers N``: the API in several processes, the scheduler in one, metrics summed."""

from __future__ import annotations


import httpx

from storage import migrations
from tests.conftest import (
    TOY_MODEL,
    ServeProcess,
    free_port,
    toy_prediction,
    wait_for_incident_state,
    write_toy_config,
)

WORKERS = 2
SCRAPES = 5


def sample(text: str, series: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None


def test_workers_share_database_and_metrics(sqlite_url, tmp_path):
    migrations.upgrade(sqlite_url)
    config = write_toy_config(tmp_path / "poisonwatch.toml", sqlite_url, free_port())
    server = ServeProcess(config, tmp_path / "serve.log", extra_args=["--workers", str(WORKERS)]).start()
    try:
        with httpx.Client(base_url=server.base_url, timeout=10.0) as client:
            client.post(f"/v1/models/{TOY_MODEL}/predictions", json={"predictions": [toy_prediction("p-1")]}).raise_for_status()
            client.post(f"/v1/models/{TOY_MODEL}/labels", json={"labels": [{"prediction_id": "p-1", "label": 2}]}).raise_for_status()
            state = wait_for_incident_state(client, "analyzed")
            scrapes = [client.get("/metrics").text for _ in range(SCRAPES)]
    finally:
        exit_code = server.terminate()

    ingested = [sample(text, f'poisonwatch_predictions_ingested_total{{model="{TOY_MODEL}"}}') for text in scrapes]
    last_scan = [sample(text, 'poisonwatch_job_last_success_timestamp_seconds{job="incident_scan"}') for text in scrapes]
    assert state == "analyzed", server.log_tail()
    assert ingested == [1.0] * SCRAPES
    assert all(value is not None and value > 0 for value in last_scan)
    assert exit_code == 0
