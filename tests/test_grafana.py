"""The provisioned Grafana files: they parse, name existing data sources and metrics, and follow the panel rules."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from monitor.metrics import Metrics
from storage import queries
from storage.db import create_db_engine, create_session_factory

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"
PROVISIONING = GRAFANA / "provisioning"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
METRIC_NAME = re.compile(r"\b(poisonwatch_[a-z_]+|up)\b(?!\s*\()")
# Series that Prometheus itself adds to every target.
PROMETHEUS_SERIES = {"up"}


def load_dashboard(path: Path) -> dict:
    return json.loads(path.read_text())


def query_panels(dashboard: dict) -> list[dict]:
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def provisioned_datasource_uids() -> set[str]:
    uids = set()
    for path in (PROVISIONING / "datasources").glob("*.yml"):
        uids.update(source["uid"] for source in yaml.safe_load(path.read_text())["datasources"])
    return uids


def exported_names(migrated_url: str) -> set[str]:
    """Return every sample name the daemon exports once each family has a value."""
    engine = create_db_engine(migrated_url)
    session_factory = create_session_factory(engine)
    with session_factory.begin() as session:
        version = queries.register_model_version(
            session, model="m", version="1", loader="unused.module:load", input_shape=(2,), num_classes=2, manifest=[]
        )
        session.flush()
        queries.record_heldout_evaluation(session, version.id, accuracy=0.5, per_class_accuracy=[0.5, 0.5], num_examples=4)
    metrics = Metrics(CollectorRegistry(), ["m"], session_factory)
    metrics.record_job_intervals({"heldout": 60.0})
    metrics.http_request_duration.labels(route="/metrics", method="GET", status="2xx").observe(0.01)
    text = metrics.exposition().decode()
    engine.dispose()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def all_expressions() -> list[str]:
    expressions = []
    for path in DASHBOARDS:
        dashboard = load_dashboard(path)
        expressions += [target["expr"] for panel in query_panels(dashboard) for target in panel["targets"]]
        expressions += [variable["definition"] for variable in dashboard["templating"]["list"] if "definition" in variable]
    for path in (PROVISIONING / "alerting").glob("*.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            expressions += [rule["data"][0]["model"]["expr"] for rule in group["rules"]]
    expressions += [
        rule["expr"] for group in yaml.safe_load((GRAFANA / "prometheus" / "rules.yml").read_text())["groups"]
        for rule in group["rules"]
    ]
    return expressions


def test_provisioning_files_parse():
    paths = sorted(PROVISIONING.rglob("*.yml"))
    documents = [yaml.safe_load(path.read_text()) for path in paths]
    assert [path.parent.name for path in paths] == ["alerting", "dashboards", "datasources"]
    assert all(document["apiVersion"] == 1 for document in documents)


def test_dashboards_parse():
    titles = [load_dashboard(path)["title"] for path in DASHBOARDS]
    assert len(titles) == 3
    assert all(title.startswith("poisonwatch: ") for title in titles)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.stem)
def test_dashboard_uses_datasource_variable(path):
    dashboard = load_dashboard(path)
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in query_panels(dashboard):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert {target["datasource"]["uid"] for target in panel["targets"]} == {"${datasource}"}, panel["title"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.stem)
def test_panels_have_unit_and_description(path):
    for panel in query_panels(load_dashboard(path)):
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert len(panel["description"]) > 20, panel["title"]
        assert panel["targets"], panel["title"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.stem)
def test_rate_windows_use_rate_interval(path):
    for panel in query_panels(load_dashboard(path)):
        for target in panel["targets"]:
            windows = re.findall(r"\b(?:rate|increase|irate)\([^\[]*\[([^\]]+)\]", target["expr"])
            assert all(window == "$__rate_interval" for window in windows), target["expr"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.stem)
def test_links_use_url_variable(path):
    dashboard = load_dashboard(path)
    names = {variable["name"] for variable in dashboard["templating"]["list"]}
    for panel in query_panels(dashboard):
        for link in panel["fieldConfig"]["defaults"].get("links", []):
            assert link["url"].startswith("${poisonwatch_url}/incidents?"), panel["title"]
            assert "poisonwatch_url" in names


def test_alert_rules_name_provisioned_datasource():
    known = provisioned_datasource_uids() | {"__expr__"}
    for path in (PROVISIONING / "alerting").glob("*.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                assert {query["datasourceUid"] for query in rule["data"]} <= known, rule["title"]


def test_datasource_uid_is_provisioned():
    assert provisioned_datasource_uids() == {"poisonwatch-prometheus"}


def test_expressions_name_exported_metrics(migrated_url):
    exported = exported_names(migrated_url) | PROMETHEUS_SERIES
    used = {name for expr in all_expressions() for name in METRIC_NAME.findall(expr)}
    assert len(used) >= 12
    assert used - exported == set()


def test_catalogue_lists_exported_metrics(migrated_url):
    catalogue = (ROOT / "docs" / "metrics.md").read_text()
    names = {name for name in exported_names(migrated_url) if not name.endswith("_created")}
    families = {re.sub(r"_(bucket|count|sum)$", "", name) for name in names}
    assert {name for name in families if f"`{name}`" not in catalogue} == set()


def test_dashboard_provider_points_at_folder():
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "poisonwatch.yml").read_text())["providers"][0]
    assert provider["type"] == "file"
    assert provider["options"]["path"].endswith("/poisonwatch")
