"""Data-parallel influence over 4 fake CPU devices equals the single-device result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np, optax
from detectors.batching import data_sharding
from detectors.influence import compute_influence, make_objective_hvp

def loss(params, x, y):
    hidden = jnp.tanh(x @ params["w1"])
    return optax.softmax_cross_entropy_with_integer_labels(hidden @ params["w2"], y)

rng = np.random.default_rng(0)
x = rng.normal(size=(50, 5)).astype(np.float32)
y = rng.integers(0, 3, 50).astype(np.int32)
params = {"w1": jnp.asarray(rng.normal(size=(5, 8)), jnp.float32), "w2": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)}
sharding = data_sharding()
report = compute_influence(loss, params, x, y, x[0], 1, l2=0.01, damping=0.1, tol=1e-6, batch_size=16, sharding=sharding)
hv = make_objective_hvp(loss, params, x, y, l2=0.01, batch_size=16, sharding=sharding)(params)
print(json.dumps({"devices": jax.local_device_count(), "sharded": sharding is not None,
                  "scores": report.scores.tolist(), "hvp": np.asarray(hv["w1"]).ravel().tolist()}))
"""


def run_with_devices(count: int) -> dict:
    environment = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}", JAX_PLATFORMS="cpu")
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs():
    return run_with_devices(1), run_with_devices(4)


def test_sharding_uses_four_devices(runs):
    single, sharded = runs
    assert single["devices"] == 1
    assert not single["sharded"]
    assert sharded["devices"] == 4
    assert sharded["sharded"]


def test_sharded_scores_equal_single_device(runs):
    single, sharded = runs
    np.testing.assert_allclose(sharded["scores"], single["scores"], rtol=1e-4, atol=1e-7)


def test_sharded_hvp_equals_single_device(runs):
    single, sharded = runs
    np.testing.assert_allclose(sharded["hvp"], single["hvp"], rtol=1e-5, atol=1e-6)
