"""``poisonwatch demo``: plant a targeted poisoning, then watch the daemon catch it.

The demo trains the digits model with a planted attack and starts the daemon
on an embedded SQLite database in the work directory. It then replays the
production split through the HTTP API as a serving application would,
predictions first and ground-truth labels later. When the target's incident
is analyzed, it prints the incident with its suspects.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import httpx
import jax
import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from monitor import demo_model, schemas
from monitor.config import Config, parse_config
from monitor.daemon import Daemon
from monitor.report import make_console, print_incident
from storage import migrations

MODEL_NAME = "digits"
REPLAY_BATCH_SIZE = 100
POLL_SECONDS = 0.5


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    workdir: str | Path = "poisonwatch-demo"
    once: bool = False
    json_output: bool = False
    seed: int = 0
    train_steps: int | None = None
    port: int = 8000
    timeout_seconds: float = 300.0


def prediction_id(row: int) -> str:
    return f"prod-{row:05d}"


def demo_config(workdir: Path, port: int) -> Config:
    """Build the daemon configuration of the demo: SQLite in ``workdir``, short job intervals.

    ``POISONWATCH_*`` environment variables override it as they override a
    config file, for example ``POISONWATCH_INFLUENCE_SOLVER=factors``.
    """
    return parse_config(
        {
            "database": {"url": f"sqlite:///{workdir / 'poisonwatch.db'}"},
            "server": {"host": "127.0.0.1", "port": port},
            "scheduler": {
                "incident_scan_interval_seconds": 1.0,
                "influence_interval_seconds": 1.0,
                "heldout_interval_seconds": 60.0,
            },
            "incidents": {"confidence_threshold": 0.9},
            "models": [{"name": MODEL_NAME, "loader": "monitor.demo_model:load", "options": {"path": str(workdir)}}],
        },
        origin="the demo's built-in configuration",
    )


def _replay(client: httpx.Client, probabilities: np.ndarray, x: np.ndarray, y: np.ndarray, progress: Progress) -> None:
    """Send every production prediction, then every label, in batches, as a serving application would."""
    n = len(x)
    task = progress.add_task("replaying predictions", total=n)
    for start in range(0, n, REPLAY_BATCH_SIZE):
        rows = range(start, min(start + REPLAY_BATCH_SIZE, n))
        body = {
            "predictions": [
                {
                    "prediction_id": prediction_id(row),
                    "predicted_class": int(np.argmax(probabilities[row])),
                    "probabilities": [float(p) for p in probabilities[row]],
                    "input": {"shape": list(x.shape[1:]), "data": [float(v) for v in x[row].ravel()]},
                }
                for row in rows
            ]
        }
        client.post(f"/v1/models/{MODEL_NAME}/predictions", json=body).raise_for_status()
        progress.advance(task, len(rows))
    task = progress.add_task("ground truth arriving", total=n)
    for start in range(0, n, REPLAY_BATCH_SIZE):
        rows = range(start, min(start + REPLAY_BATCH_SIZE, n))
        body = {"labels": [{"prediction_id": prediction_id(row), "label": int(y[row])} for row in rows]}
        client.post(f"/v1/models/{MODEL_NAME}/labels", json=body).raise_for_status()
        progress.advance(task, len(rows))


def _wait_for_analysis(client: httpx.Client, target_id: str, timeout: float, progress: Progress) -> schemas.IncidentDetail:
    task = progress.add_task("waiting for the target's incident to be analyzed", total=None)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        incidents = client.get("/v1/incidents", params={"model": MODEL_NAME, "limit": 1000}).raise_for_status().json()
        match = next((incident for incident in incidents if incident["prediction_id"] == target_id), None)
        if match is not None and match["state"] in ("analyzed", "failed"):
            progress.update(task, total=1, completed=1)
            detail = client.get(f"/v1/incidents/{match['id']}").raise_for_status().json()
            return schemas.IncidentDetail.model_validate(detail)
        time.sleep(POLL_SECONDS)
    raise TimeoutError(f"no analyzed incident for prediction {target_id} within {timeout:.0f} s")


def run_demo(options: DemoOptions) -> int:
    """Run the demo end to end; return the process exit status."""
    workdir = Path(options.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    console = make_console(stderr=True)
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
        disable=not console.is_terminal,
    )
    # Progress goes to standard error, so it never mixes with the JSON on standard output.
    say = console.print

    say(f"training the digits model with a planted attack (work directory {workdir})")
    build_options = {"seed": options.seed, "progress": say}
    if options.train_steps is not None:
        build_options["steps"] = options.train_steps
    artifacts = demo_model.build_demo(workdir, **build_options)
    if not artifacts.attack_succeeded:
        console.print(
            f"[red]the planted attack failed[/red]: the poisoned model gives the attacker's class "
            f"{artifacts.attacker_class} probability {artifacts.target_confidence:.3f} on the target; "
            "try another --seed or more --train-steps"
        )
        return 1

    config = demo_config(workdir, options.port)
    database = workdir / "poisonwatch.db"
    for stale in (database, database.with_name(database.name + "-wal"), database.with_name(database.name + "-shm")):
        stale.unlink(missing_ok=True)
    migrations.upgrade(config.database.url)

    bundle = demo_model.load({"path": str(workdir)})
    data = np.load(workdir / demo_model.DATA_FILE)
    production_x, production_y = data["production_x"], data["production_y"]
    probabilities = np.asarray(jax.nn.softmax(jax.jit(bundle.apply)(bundle.params, production_x)), dtype=np.float64)
    probabilities /= probabilities.sum(axis=1, keepdims=True)

    daemon = Daemon(config)
    daemon.start()
    try:
        say(f"daemon serving on {daemon.base_url} (metrics at {daemon.base_url}/metrics)")
        with progress, httpx.Client(base_url=daemon.base_url, timeout=60.0) as client:
            _replay(client, probabilities, production_x, production_y, progress)
            incident = _wait_for_analysis(
                client, prediction_id(artifacts.target_index), options.timeout_seconds, progress
            )
        summary = _summary(artifacts, incident)
        if options.json_output:
            print(json.dumps(summary))
        else:
            results = make_console()
            print_incident(incident, planted=set(artifacts.poison_ids), console=results)
            results.print(
                f"planted poisons in the top 10: {summary['poisons_in_top10']} of {len(artifacts.poison_ids)} "
                f"(recall {summary['recall_at_10']:.2f}); held-out accuracy clean "
                f"{artifacts.clean_heldout_accuracy:.4f}, poisoned {artifacts.poisoned_heldout_accuracy:.4f}"
            )
        if not options.once:
            say(f"still serving on {daemon.base_url}; try /v1/incidents and /metrics. Ctrl-C stops.")
            try:
                daemon.wait()
            except KeyboardInterrupt:
                pass
    finally:
        daemon.stop()
    return 0 if incident.state == "analyzed" else 1


def _summary(artifacts: demo_model.DemoArtifacts, incident: schemas.IncidentDetail) -> dict:
    top10 = incident.suspects[:10]
    poisons = set(artifacts.poison_ids)
    found = sum(suspect.example_id in poisons for suspect in top10)
    return {
        "incident_id": incident.id,
        "incident_state": incident.state,
        "target_index": artifacts.target_index,
        "target_prediction_id": incident.prediction_id,
        "true_label": incident.true_label,
        "predicted_class": incident.predicted_class,
        "confidence": incident.confidence,
        "attacker_class": artifacts.attacker_class,
        "score_kind": incident.score_kind,
        "top10": [
            {"example_id": s.example_id, "score": s.score, "rank_score": s.rank_score, "source": s.source}
            for s in top10
        ],
        "source_influence": [source.model_dump() for source in incident.source_influence],
        "planted_poison_ids": list(artifacts.poison_ids),
        "poisons_in_top10": found,
        "recall_at_10": found / len(poisons) if poisons else 0.0,
        "solver": incident.solver.method,
        "solver_converged": incident.solver.converged,
        "ranking_reliable": incident.ranking_reliable,
        "solver_iterations": incident.solver.iterations,
        "solver_relative_residual": incident.solver.relative_residual,
        "clean_heldout_accuracy": artifacts.clean_heldout_accuracy,
        "poisoned_heldout_accuracy": artifacts.poisoned_heldout_accuracy,
        "heldout_accuracy_drop_points": 100 * (artifacts.clean_heldout_accuracy - artifacts.poisoned_heldout_accuracy),
    }


if __name__ == "__main__":
    sys.exit(run_demo(DemoOptions()))
