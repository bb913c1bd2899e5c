"""The daemon on a toy model: start-up checks, jobs, and the HTTP flow from prediction to analysis."""

from __future__ import annotations

import subprocess
import sys
from unittest import mock

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import select

from monitor import jobs
from monitor.config import Config, DatabaseConfig, InfluenceConfig, ModelConfig, SchedulerConfig, ServerConfig
from monitor.daemon import Daemon
from monitor.errors import DatabaseNotMigratedError
from storage.db import create_db_engine
from storage.models import ReleaseCheck
from tests import toy_model
from tests.conftest import wait_for_incident_state

MODEL = "toy"


def toy_config(url: str, *, scheduler: bool, solver: str = "cg") -> Config:
    return Config(
        database=DatabaseConfig(url=url),
        server=ServerConfig(port=0),
        scheduler=SchedulerConfig(
            enabled=scheduler, incident_scan_interval_seconds=0.2, influence_interval_seconds=0.2
        ),
        influence=InfluenceConfig(solver=solver, factor_rank=8),
        models=[ModelConfig(name=MODEL, loader="tests.toy_model:load")],
    )


def post_misclassification(client: httpx.Client, prediction_id: str = "p-1") -> None:
    x, _ = toy_model.make_data(5, 1)
    body = {
        "predictions": [
            {
                "prediction_id": prediction_id,
                "predicted_class": 0,
                "probabilities": [0.96, 0.02, 0.02],
                "input": {"shape": list(toy_model.INPUT_SHAPE), "data": x.ravel().tolist()},
            }
        ]
    }
    client.post(f"/v1/models/{MODEL}/predictions", json=body).raise_for_status()
    client.post(f"/v1/models/{MODEL}/labels", json={"labels": [{"prediction_id": prediction_id, "label": 2}]}).raise_for_status()


def test_start_rejects_unmigrated_database(sqlite_url):
    daemon = Daemon(toy_config(sqlite_url, scheduler=False), registry=CollectorRegistry())
    with pytest.raises(DatabaseNotMigratedError, match="poisonwatch db upgrade"):
        daemon.start(serve_http=False)
    daemon.stop()


def test_serve_command_names_upgrade(tmp_path):
    config = tmp_path / "poisonwatch.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "fresh.db"}"\n')
    result = subprocess.run(
        [sys.executable, "-m", "monitor.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "poisonwatch db upgrade" in result.stderr


def test_jobs_open_and_analyze_incident(migrated_url):
    daemon = Daemon(toy_config(migrated_url, scheduler=False), registry=CollectorRegistry())
    daemon.start()
    try:
        with httpx.Client(base_url=daemon.base_url) as client:
            post_misclassification(client)
            assert jobs.scan_incidents(daemon.context) == 1
            assert jobs.analyze_incidents(daemon.context) == 1
            incidents = client.get("/v1/incidents").json()
            detail = client.get(f"/v1/incidents/{incidents[0]['id']}").json()
            page = client.get(f"/incidents/{incidents[0]['id']}").text
    finally:
        daemon.stop()
    assert detail["state"] == "analyzed"
    assert detail["suspects"][0]["example_id"] in page
    assert "converged" in page
    assert detail["solver"]["converged"] is True
    assert len(detail["suspects"]) == 10
    rank_scores = [suspect["rank_score"] for suspect in detail["suspects"]]
    assert rank_scores == sorted(rank_scores)
    assert detail["score_kind"] == "gradient-norm"
    assert detail["ranking_reliable"] is True
    assert {source["source"] for source in detail["source_influence"]} == {"vendor-a", "vendor-b"}
    assert detail["true_label"] == 2


def test_factors_solver_reuses_release_check(migrated_url):
    daemon = Daemon(toy_config(migrated_url, scheduler=False, solver="factors"), registry=CollectorRegistry())
    daemon.start()
    try:
        with httpx.Client(base_url=daemon.base_url) as client:
            post_misclassification(client, "p-1")
            post_misclassification(client, "p-2")
            jobs.run_release_checks(daemon.context)
            jobs.scan_incidents(daemon.context)
            analyzed = jobs.analyze_incidents(daemon.context)
            details = [client.get(f"/v1/incidents/{i['id']}").json() for i in client.get("/v1/incidents").json()]
        with daemon.session_factory() as session:
            checks = session.scalars(select(ReleaseCheck)).all()
    finally:
        daemon.stop()
    assert analyzed == 2
    assert sorted(check.kind.value for check in checks) == ["gradient_norms", "hessian_factors"]
    assert [detail["solver"]["method"] for detail in details] == ["factors", "factors"]
    assert all(detail["state"] == "analyzed" for detail in details)
    assert all(len(detail["suspects"]) == 10 for detail in details)


def test_release_checks_load_after_restart(migrated_url):
    first = Daemon(toy_config(migrated_url, scheduler=False, solver="factors"), registry=CollectorRegistry())
    first.start(serve_http=False)
    try:
        jobs.run_release_checks(first.context)
    finally:
        first.stop()
    second = Daemon(toy_config(migrated_url, scheduler=False, solver="factors"), registry=CollectorRegistry())
    second.start(serve_http=False)
    try:
        _, version_id, bundle = second.models.items()[0]
        with mock.patch("detectors.factors.compute_factors", side_effect=AssertionError("recomputed")):
            checks = second.context.release_checks.ensure(version_id, bundle)
    finally:
        second.stop()
    assert checks.factors is not None
    assert checks.factors.rank >= 1
    assert checks.gradient_norms.shape == (len(bundle.train.ids),)


def test_heldout_job_sets_accuracy_gauge(migrated_url):
    daemon = Daemon(toy_config(migrated_url, scheduler=False), registry=CollectorRegistry())
    daemon.start(serve_http=False)
    try:
        jobs.evaluate_heldout(daemon.context)
        accuracy = daemon.metrics.registry.get_sample_value(
            "poisonwatch_heldout_accuracy_ratio", {"model": MODEL, "version": "1"}
        )
    finally:
        daemon.stop()
    assert accuracy is not None
    assert 0.8 <= accuracy <= 1.0


def test_failed_analysis_stores_reason(migrated_url):
    daemon = Daemon(toy_config(migrated_url, scheduler=False), registry=CollectorRegistry())
    daemon.start()
    try:
        name, version_id, bundle = daemon.models.items()[0]
        broken = {"w": np.full_like(bundle.params["w"], np.nan), "b": bundle.params["b"]}
        daemon.models._bundles[name] = type(bundle)(**{**bundle.__dict__, "params": broken})
        with httpx.Client(base_url=daemon.base_url) as client:
            post_misclassification(client)
            jobs.scan_incidents(daemon.context)
            jobs.analyze_incidents(daemon.context)
            incident = client.get("/v1/incidents").json()[0]
            detail = client.get(f"/v1/incidents/{incident['id']}").json()
    finally:
        daemon.stop()
    assert detail["state"] == "failed"
    assert "non-finite" in detail["failure_reason"]
    assert daemon.metrics.registry.get_sample_value("poisonwatch_influence_failures_total", {"model": MODEL}) == 1


def test_scheduler_analyzes_without_help(migrated_url):
    daemon = Daemon(toy_config(migrated_url, scheduler=True), registry=CollectorRegistry())
    daemon.start()
    try:
        with httpx.Client(base_url=daemon.base_url) as client:
            post_misclassification(client)
            state = wait_for_incident_state(client, "analyzed")
            metrics = client.get("/metrics").text
    finally:
        daemon.stop()
    assert state == "analyzed"
    assert 'poisonwatch_incidents{model="toy",state="analyzed"} 1.0' in metrics
    assert 'poisonwatch_incidents_opened_total{model="toy"} 1.0' in metrics


def test_parameter_subset_limits_factors(migrated_url):
    config = toy_config(migrated_url, scheduler=False, solver="factors")
    config = config.model_copy(
        update={"models": [ModelConfig(name=MODEL, loader="tests.toy_model:load", options={"weights_only": True})]}
    )
    daemon = Daemon(config, registry=CollectorRegistry())
    daemon.start()
    try:
        _, version_id, bundle = daemon.models.items()[0]
        checks = daemon.context.release_checks.ensure(version_id, bundle)
        with httpx.Client(base_url=daemon.base_url) as client:
            post_misclassification(client)
            jobs.scan_incidents(daemon.context)
            jobs.analyze_incidents(daemon.context)
            detail = client.get(f"/v1/incidents/{client.get('/v1/incidents').json()[0]['id']}").json()
    finally:
        daemon.stop()
    assert list(checks.params) == ["['w']"]
    assert checks.factors.eigenvectors.shape[1] == 4 * toy_model.NUM_CLASSES
    assert detail["state"] == "analyzed"
    assert detail["solver"]["method"] == "factors"


def run_incidents_command(config, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "monitor.cli", "incidents", *arguments, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_incidents_command_rejects_missing_database(tmp_path):
    config = tmp_path / "poisonwatch.toml"
    database = tmp_path / "absent.db"
    config.write_text(f'[database]\nurl = "sqlite:///{database}"\n')
    result = run_incidents_command(config, "list")
    assert result.returncode == 2
    assert "absent.db not found" in result.stderr
    assert "Traceback" not in result.stderr
    assert not database.exists()


def test_incidents_command_rejects_unmigrated_database(sqlite_url, tmp_path):
    create_db_engine(sqlite_url).connect().close()
    config = tmp_path / "poisonwatch.toml"
    config.write_text(f'[database]\nurl = "{sqlite_url}"\n')
    result = run_incidents_command(config, "show", "1")
    assert result.returncode == 2
    assert "poisonwatch db upgrade" in result.stderr
    assert "Traceback" not in result.stderr
