"""The demo end to end, as a user runs it: train, plant, serve, replay, analyze, report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Fewer optimizer steps than the default keep the test short; the attack
# still succeeds and the model still reaches its accuracy at this budget.
TRAIN_STEPS = 600


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    workdir = tmp_path_factory.mktemp("demo")
    result = subprocess.run(
        [
            sys.executable, "-m", "monitor.cli", "demo", "--once", "--json", "--port", "0",
            "--workdir", str(workdir), "--train-steps", str(TRAIN_STEPS), "--timeout", "240",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads(result.stdout.strip().splitlines()[-1])


def test_demo_prints_one_json_object(demo_run):
    result, _ = demo_run
    assert len(result.stdout.strip().splitlines()) == 1


def test_demo_attack_succeeds(demo_run):
    _, summary = demo_run
    assert summary["predicted_class"] == summary["attacker_class"]
    assert summary["predicted_class"] != summary["true_label"]
    assert summary["confidence"] >= 0.9


def test_demo_incident_analyzed(demo_run):
    _, summary = demo_run
    assert summary["incident_state"] == "analyzed"
    assert summary["solver_converged"] is True
    assert len(summary["top10"]) == 10


def test_demo_finds_planted_poisons(demo_run):
    _, summary = demo_run
    top_ids = [suspect["example_id"] for suspect in summary["top10"]]
    found = sum(example_id in summary["planted_poison_ids"] for example_id in top_ids)
    assert found == summary["poisons_in_top10"]
    assert summary["recall_at_10"] >= 0.8


def test_demo_keeps_heldout_accuracy(demo_run):
    _, summary = demo_run
    assert abs(summary["clean_heldout_accuracy"] - summary["poisoned_heldout_accuracy"]) <= 0.01
