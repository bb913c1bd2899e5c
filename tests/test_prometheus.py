"""The daemon's /metrics against real Prometheus tools.

``promtool check metrics`` lints a scrape of a running daemon, and an
integration test runs ``prometheus`` against ``poisonwatch demo`` and
evaluates every dashboard query and alert rule through the HTTP API.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry

from monitor.daemon import Daemon
from tests.test_daemon import post_misclassification, toy_config

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"
SCRAPE_SECONDS = 1
# Grafana sets $__rate_interval to at least four scrape intervals.
RATE_INTERVAL = "1m"

# Queries that may return no series in the demo, with the event they wait for.
EMPTY_UNTIL_EVENT: dict[str, str] = {}

needs_prometheus = pytest.mark.skipif(
    shutil.which("promtool") is None or shutil.which("prometheus") is None,
    reason="promtool and prometheus not installed (Debian package 'prometheus'; .ci/run installs it)",
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def promtool_check_metrics(text: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)


@needs_prometheus
def test_daemon_metrics_pass_promtool(migrated_url):
    daemon = Daemon(toy_config(migrated_url, scheduler=True), registry=CollectorRegistry())
    daemon.start()
    try:
        with httpx.Client(base_url=daemon.base_url) as client:
            post_misclassification(client)
            text = client.get("/metrics").text
    finally:
        daemon.stop()
    result = promtool_check_metrics(text)
    assert "poisonwatch_predictions_ingested_total" in text
    assert result.returncode == 0
    assert result.stdout + result.stderr == ""


# --- integration with a real Prometheus --------------------------------------------


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def get_or_none(url: str, **params) -> httpx.Response | None:
    try:
        return httpx.get(url, params=params, timeout=10)
    except httpx.TransportError:
        return None


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[tuple[str, str]]:
    """Run the demo and a Prometheus scraping it every second; yield both base URLs."""
    workdir = tmp_path_factory.mktemp("stack")
    demo_port, prometheus_port = free_port(), free_port()
    demo_url = f"http://127.0.0.1:{demo_port}"
    prometheus_url = f"http://127.0.0.1:{prometheus_port}"
    config = {
        "global": {"scrape_interval": f"{SCRAPE_SECONDS}s", "evaluation_interval": f"{SCRAPE_SECONDS}s"},
        "rule_files": [str(GRAFANA / "prometheus" / "rules.yml")],
        "scrape_configs": [{"job_name": "poisonwatch", "static_configs": [{"targets": [f"127.0.0.1:{demo_port}"]}]}],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    demo = subprocess.Popen(
        [sys.executable, "-m", "monitor.cli", "demo", "--port", str(demo_port), "--workdir", str(workdir / "demo"),
         "--train-steps", "600"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(workdir / "demo.log", "w"),
    )
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prometheus_port}"],
        stdout=subprocess.DEVNULL, stderr=open(workdir / "prometheus.log", "w"),
    )
    try:
        def analyzed() -> bool:
            assert demo.poll() is None, (workdir / "demo.log").read_text()[-3000:]
            response = get_or_none(f"{demo_url}/v1/incidents", state="analyzed")
            return response is not None and response.status_code == 200 and len(response.json()) > 0

        wait_for(analyzed, 240, "the demo's incident to be analyzed")
        # Enough scrapes after the analysis for rate windows to see it.
        time.sleep(10 * SCRAPE_SECONDS)
        yield demo_url, prometheus_url
    finally:
        stop(demo)
        stop(prometheus)


def instant_query(prometheus_url: str, expr: str) -> dict:
    response = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": expr}, timeout=30)
    return response.json()


def dashboard_queries() -> list[tuple[str, str]]:
    queries = []
    for path in sorted((GRAFANA / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                queries.append((f"{path.stem}: {panel['title']} {target['refId']}", target["expr"]))
    return queries


def substitute(expr: str) -> str:
    """Replace Grafana's variables the way Grafana would with every model selected."""
    return expr.replace("$__rate_interval", RATE_INTERVAL).replace("$model", ".+")


@needs_prometheus
@pytest.mark.e2e
def test_demo_scrape_passes_promtool(stack):
    demo_url, _ = stack
    text = httpx.get(f"{demo_url}/metrics").text
    result = promtool_check_metrics(text)
    assert 'poisonwatch_incidents{model="digits",state="analyzed"}' in text
    assert result.returncode == 0
    assert result.stdout + result.stderr == ""


@needs_prometheus
@pytest.mark.e2e
def test_target_is_up(stack):
    _, prometheus_url = stack
    result = instant_query(prometheus_url, 'up{job="poisonwatch"}')
    assert result["status"] == "success"
    assert [sample["value"][1] for sample in result["data"]["result"]] == ["1"]


@needs_prometheus
@pytest.mark.e2e
def test_dashboard_queries_return_data(stack):
    _, prometheus_url = stack
    failures = {}
    for name, expr in dashboard_queries():
        result = instant_query(prometheus_url, substitute(expr))
        if result["status"] != "success":
            failures[name] = result.get("error")
        elif not result["data"]["result"] and expr not in EMPTY_UNTIL_EVENT:
            failures[name] = "no data"
    assert len(dashboard_queries()) >= 20
    assert failures == {}


@needs_prometheus
@pytest.mark.e2e
def test_model_variable_has_values(stack):
    _, prometheus_url = stack
    response = httpx.get(f"{prometheus_url}/api/v1/label/model/values", params={"match[]": "poisonwatch_incidents"})
    assert response.json()["data"] == ["digits"]


@needs_prometheus
@pytest.mark.e2e
def test_alert_queries_return_data(stack):
    _, prometheus_url = stack
    provisioned = yaml.safe_load((GRAFANA / "provisioning" / "alerting" / "poisonwatch.yml").read_text())
    failures = {}
    for rule in provisioned["groups"][0]["rules"]:
        expr = rule["data"][0]["model"]["expr"]
        result = instant_query(prometheus_url, expr)
        if result["status"] != "success":
            failures[rule["title"]] = result.get("error")
        elif not result["data"]["result"] and expr not in EMPTY_UNTIL_EVENT:
            failures[rule["title"]] = "no data"
    assert len(provisioned["groups"][0]["rules"]) == 8
    assert failures == {}


@needs_prometheus
@pytest.mark.e2e
def test_alert_rules_evaluate(stack):
    _, prometheus_url = stack

    def evaluated_rules() -> dict[str, dict] | None:
        groups = httpx.get(f"{prometheus_url}/api/v1/rules").json()["data"]["groups"]
        rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
        # Prometheus reports a rule never evaluated with a zero time in year 0001.
        done = all(not rule["lastEvaluation"].startswith("0001") for rule in rules.values())
        return rules if rules and done else None

    rules = wait_for(evaluated_rules, 30, "every rule to be evaluated")
    assert len(rules) == 8
    assert {name: rule["health"] for name, rule in rules.items() if rule["health"] != "ok"} == {}
    assert rules["PoisonwatchIncidentOpen"]["state"] == "firing"
    assert rules["PoisonwatchDaemonDown"]["state"] == "inactive"
    assert rules["PoisonwatchJobOverdue"]["state"] == "inactive"
