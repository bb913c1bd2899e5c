"""The alert rules: valid for promtool, unit-tested, identical in Prometheus and Grafana, with runbooks."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES_DIR = ROOT / "grafana" / "prometheus"
GRAFANA_RULES = ROOT / "grafana" / "provisioning" / "alerting" / "poisonwatch.yml"
EVALUATORS = {"gt": ">", "lt": "<"}

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (Debian package 'prometheus'; .ci/run installs it)",
)


def prometheus_rules() -> dict[str, dict]:
    groups = yaml.safe_load((RULES_DIR / "rules.yml").read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def grafana_rules() -> dict[str, dict]:
    groups = yaml.safe_load(GRAFANA_RULES.read_text())["groups"]
    return {rule["title"]: rule for group in groups for rule in group["rules"]}


@needs_promtool
def test_promtool_check_rules():
    result = subprocess.run(["promtool", "check", "rules", "rules.yml"], cwd=RULES_DIR, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(prometheus_rules())} rules found" in result.stdout


@needs_promtool
def test_promtool_unit_tests_pass():
    result = subprocess.run(["promtool", "test", "rules", "rules_test.yml"], cwd=RULES_DIR, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_each_alert_fires_and_stays_silent():
    cases = yaml.safe_load((RULES_DIR / "rules_test.yml").read_text())["tests"]
    firing, silent = set(), set()
    for case in cases:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else silent).add(check["alertname"])
    assert firing == set(prometheus_rules())
    assert silent == set(prometheus_rules())


def test_grafana_rules_match_prometheus():
    grafana = grafana_rules()
    assert set(grafana) == set(prometheus_rules())
    for name, rule in prometheus_rules().items():
        query, reduce, threshold = grafana[name]["data"]
        evaluator = threshold["model"]["conditions"][0]["evaluator"]
        expected = f"({query['model']['expr']}) {EVALUATORS[evaluator['type']]} {evaluator['params'][0]:g}"
        assert rule["expr"] == expected, name
        assert reduce["model"]["expression"] == "A"
        assert threshold["model"]["expression"] == "B"
        assert grafana[name]["condition"] == "C"
        assert grafana[name]["for"] == rule["for"], name
        assert grafana[name]["labels"] == rule["labels"], name


def test_annotations_match_between_formats():
    grafana = grafana_rules()
    for name, rule in prometheus_rules().items():
        translated = {key: value.replace("$values.B.Value", "$value") for key, value in grafana[name]["annotations"].items()}
        assert translated == rule["annotations"], name


@pytest.mark.parametrize("name", sorted(prometheus_rules()))
def test_alert_has_runbook(name):
    rule = prometheus_rules()[name]
    runbook = ROOT / rule["annotations"]["runbook_url"]
    text = runbook.read_text()
    assert rule["annotations"]["summary"]
    assert re.search(r"^## What it means", text, re.MULTILINE)
    assert re.search(r"^## How to investigate", text, re.MULTILINE)
    assert re.search(r"^## How to resolve", text, re.MULTILINE)
    assert re.search(r"`poisonwatch (incidents|serve|db)", text)


def test_incident_alerts_link_incident_page():
    rules = prometheus_rules()
    for name in ("PoisonwatchIncidentOpen", "PoisonwatchInfluenceAnalysisFailed", "PoisonwatchInfluenceUnconverged"):
        assert "/incidents?model={{ $labels.model }}" in rules[name]["annotations"]["incident_url"], name


def test_generated_files_are_current():
    result = subprocess.run([sys.executable, "grafana/generate.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
