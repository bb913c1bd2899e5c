"""Ingestion throughput: predictions per second through the HTTP API against raw SQLAlchemy Core inserts.

Both paths write the same rows into the same database in one run, so the
ratio is measured under the same conditions. The API runs in its own process
(uvicorn, as ``poisonwatch serve`` runs it) and one client posts pre-encoded
JSON batches one after another; the raw path inserts prepared row dicts with
``Connection.execute(insert, rows)``, one transaction per batch.

The API is measured with each input in both of its forms: base64 float32
bytes (``data_base64``, what ``monitor.client`` sends) and JSON numbers
(``data``). The headline ratio is the first.

    .venv/bin/python benchmarks/ingest.py --postgres-url postgresql+psycopg://postgres@127.0.0.1:5432/pw_bench

The PostgreSQL database named by ``--postgres-url`` is emptied. The last line
of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from sqlalchemy import delete, text

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))

from storage import migrations, queries  # noqa: E402
from storage.db import create_db_engine, create_session_factory, masked_url  # noqa: E402
from storage.models import Label, Prediction  # noqa: E402

MODEL = "bench"
NUM_CLASSES = 10
INPUT_SHAPE = [8, 8]


def register_model(url: str) -> int:
    engine = create_db_engine(url)
    with create_session_factory(engine).begin() as session:
        version = queries.register_model_version(
            session, model=MODEL, version="1", loader="unused:load", input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES, manifest=[]
        )
        version_id = version.id
    engine.dispose()
    return version_id


def serve(url: str, port: int) -> None:
    """Run the API alone (no scheduler, no model loading) on 127.0.0.1:``port``."""
    import uvicorn
    from prometheus_client import CollectorRegistry

    from monitor.api import ApiState, create_app, freeze_startup_objects
    from monitor.config import Config, DatabaseConfig, ModelConfig, ServerConfig
    from monitor.metrics import Metrics

    config = Config(
        database=DatabaseConfig(url=url),
        server=ServerConfig(port=port, max_batch_size=10_000),
        models=[ModelConfig(name=MODEL, loader="unused:load")],
    )
    session_factory = create_session_factory(create_db_engine(url))
    state = ApiState(config=config, session_factory=session_factory, metrics=Metrics(CollectorRegistry(), [MODEL], session_factory))
    app = create_app(state)
    # As poisonwatch serve does after start-up.
    freeze_startup_objects()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def make_items(prefix: str, count: int, seed: int, base64_inputs: bool = False) -> list[dict]:
    rng = np.random.default_rng(seed)
    inputs = rng.random((count, 64), dtype=np.float32).round(4)
    logits = rng.normal(size=(count, NUM_CLASSES))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    timestamp = dt.datetime.now(dt.UTC).isoformat()
    return [
        {
            "prediction_id": f"{prefix}-{index}",
            "predicted_class": int(probabilities[index].argmax()),
            "probabilities": [round(float(value), 6) for value in probabilities[index]],
            "input": {"shape": INPUT_SHAPE, "data_base64": base64.b64encode(inputs[index].tobytes()).decode()}
            if base64_inputs
            else {"shape": INPUT_SHAPE, "data": [float(value) for value in inputs[index]]},
            "timestamp": timestamp,
        }
        for index in range(count)
    ]


def raw_rows(items: list[dict], version_id: int) -> list[dict]:
    """Build the rows the API would store for ``items``, ahead of timing.

    Every column the API writes is here with the same type and size. Only
    ``content_digest`` differs in value: it is a SHA-256 of the input alone,
    while the API's digest also covers the other fields.
    """
    rows = []
    received = dt.datetime.now(dt.UTC)
    for item in items:
        if "data" in item["input"]:
            data = np.asarray(item["input"]["data"], dtype="<f4")
        else:
            data = np.frombuffer(base64.b64decode(item["input"]["data_base64"]), dtype="<f4")
        probabilities = np.asarray(item["probabilities"], dtype="<f4")
        rows.append(
            {
                "model": MODEL,
                "prediction_id": item["prediction_id"],
                "model_version_id": version_id,
                "predicted_class": item["predicted_class"],
                "confidence": float(item["probabilities"][item["predicted_class"]]),
                "probabilities": probabilities.tobytes(),
                "input_shape": INPUT_SHAPE,
                "input_data": data.tobytes(),
                "content_digest": hashlib.sha256(data.tobytes()).hexdigest(),
                "predicted_at": received,
                "received_at": received,
            }
        )
    return rows


def wait_until_up(base_url: str, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"API process exited with {process.returncode}")
        try:
            if httpx.get(f"{base_url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"API not up within {timeout} s")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def measure_api(url: str, bodies: list[bytes], batch_size: int) -> float:
    port = free_port()
    process = subprocess.Popen([sys.executable, __file__, "--serve", url, str(port)], cwd=REPOSITORY)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(base_url, process)
        with httpx.Client(base_url=base_url, timeout=60.0, headers={"Content-Type": "application/json"}) as client:
            # One warm-up batch outside the timing: connection set-up and first-request imports.
            client.post(f"/v1/models/{MODEL}/predictions", content=bodies[0]).raise_for_status()
            started = time.perf_counter()
            for body in bodies[1:]:
                response = client.post(f"/v1/models/{MODEL}/predictions", content=body)
                response.raise_for_status()
            seconds = time.perf_counter() - started
    finally:
        process.terminate()
        process.wait(30)
    return (len(bodies) - 1) * batch_size / seconds


def measure_raw(url: str, batches: list[list[dict]]) -> float:
    engine = create_db_engine(url)
    table = Prediction.__table__
    with engine.begin() as connection:
        connection.execute(table.insert(), batches[0])
    started = time.perf_counter()
    for rows in batches[1:]:
        with engine.begin() as connection:
            connection.execute(table.insert(), rows)
    seconds = time.perf_counter() - started
    engine.dispose()
    return sum(len(rows) for rows in batches[1:]) / seconds


def empty_predictions(url: str) -> None:
    engine = create_db_engine(url)
    with engine.begin() as connection:
        connection.execute(delete(Label))
        connection.execute(delete(Prediction))
    engine.dispose()


def reset_postgres(url: str) -> None:
    engine = create_db_engine(url)
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))
    engine.dispose()


def run_backend(name: str, url: str, batch_size: int, num_batches: int, rounds: int) -> dict:
    migrations.upgrade(url)
    version_id = register_model(url)
    rates: dict[str, list[float]] = {"api": [], "api_numbers": [], "raw": []}
    for round_index in range(rounds):
        # The three measurements alternate, each into an emptied table, so none benefits from the others' order.
        bodies = {
            "api": encode_bodies(f"api{round_index}", batch_size, num_batches, base64_inputs=True),
            "api_numbers": encode_bodies(f"num{round_index}", batch_size, num_batches, base64_inputs=False),
        }
        raw_batches = [raw_rows(make_items(f"raw{round_index}-{batch}", batch_size, seed=batch), version_id) for batch in range(num_batches)]
        for path, path_bodies in bodies.items():
            empty_predictions(url)
            rates[path].append(measure_api(url, path_bodies, batch_size))
        empty_predictions(url)
        rates["raw"].append(measure_raw(url, raw_batches))
    median = {path: float(np.median(values)) for path, values in rates.items()}
    return {
        "backend": name,
        "api_predictions_per_second": round(median["api"], 1),
        "api_numbers_predictions_per_second": round(median["api_numbers"], 1),
        "raw_predictions_per_second": round(median["raw"], 1),
        "ratio": round(median["api"] / median["raw"], 3),
        "ratio_numbers": round(median["api_numbers"] / median["raw"], 3),
        "api_rounds": [round(rate, 1) for rate in rates["api"]],
        "api_numbers_rounds": [round(rate, 1) for rate in rates["api_numbers"]],
        "raw_rounds": [round(rate, 1) for rate in rates["raw"]],
        # Each round's runs follow each other, so these ratios show how much
        # load from other processes moved the result.
        "round_ratios": [round(api / raw, 3) for api, raw in zip(rates["api"], rates["raw"])],
    }


def encode_bodies(prefix: str, batch_size: int, num_batches: int, base64_inputs: bool) -> list[bytes]:
    return [
        json.dumps({"predictions": make_items(f"{prefix}-{batch}", batch_size, seed=batch, base64_inputs=base64_inputs)}).encode()
        for batch in range(num_batches)
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=500, help="predictions per request and per raw insert")
    parser.add_argument("--batches", type=int, default=21, help="batches per measurement; the first is a warm-up")
    parser.add_argument("--rounds", type=int, default=5, help="measurements per path; the median is reported")
    parser.add_argument("--postgres-url", default=os.environ.get("POISONWATCH_BENCH_POSTGRES_URL"),
                        help="PostgreSQL database to empty and use; PostgreSQL is skipped without it")
    parser.add_argument("--serve", nargs=2, metavar=("URL", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return 0

    results = []
    with tempfile.TemporaryDirectory() as folder:
        results.append(run_backend("sqlite", f"sqlite:///{folder}/bench.db", args.batch_size, args.batches, args.rounds))
    if args.postgres_url:
        reset_postgres(args.postgres_url)
        results.append(run_backend("postgresql", args.postgres_url, args.batch_size, args.batches, args.rounds))
    else:
        print("PostgreSQL skipped: pass --postgres-url or set POISONWATCH_BENCH_POSTGRES_URL", file=sys.stderr)

    print(f"{'backend':<12}{'inputs':<10}{'API pred/s':>14}{'raw pred/s':>14}{'API/raw':>10}")
    for result in results:
        for inputs, rate, ratio in (
            ("base64", result["api_predictions_per_second"], result["ratio"]),
            ("numbers", result["api_numbers_predictions_per_second"], result["ratio_numbers"]),
        ):
            print(f"{result['backend']:<12}{inputs:<10}{rate:>14,.0f}{result['raw_predictions_per_second']:>14,.0f}{ratio:>10.2f}")
    summary = {
        "batch_size": args.batch_size,
        "timed_batches": args.batches - 1,
        "rounds": args.rounds,
        "input_values": 64,
        "classes": NUM_CLASSES,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "postgres": masked_url(args.postgres_url) if args.postgres_url else None,
        "results": results,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
