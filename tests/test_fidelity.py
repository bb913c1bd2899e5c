"""Influence against actual leave-one-out retraining on scikit-learn's digits (logistic regression)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

from detectors.fidelity import fidelity_figures, make_newton_trainer, retrain_without
from detectors.influence import compute_influence
from detectors.newton import newton_loo_effects

N_TRAIN = 300
L2 = 0.01


def linear_loss(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(x @ params["w"] + params["b"], y)


@pytest.fixture(scope="module")
def loo_case():
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    train_x, train_y, test_x, test_y = x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:600], y[N_TRAIN:600]
    start = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}
    train = make_newton_trainer(linear_loss, start, train_x, train_y, l2=L2)
    optimum, gradient_norm = train(np.ones(N_TRAIN), start)
    with jax.enable_x64(True):
        losses = np.asarray(linear_loss(optimum, jnp.asarray(test_x, jnp.float64), jnp.asarray(test_y)))
    incident = int(np.argmax(losses))
    params = jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float32), optimum)
    report = compute_influence(linear_loss, params, train_x, train_y, test_x[incident], test_y[incident],
                               l2=L2, damping=0.0, tol=1e-5, maxiter=1000)
    order = np.argsort(-np.abs(report.scores))
    rows = np.concatenate([order[:8], np.random.default_rng(0).choice(order[8:], 4, replace=False)])
    newton = newton_loo_effects(linear_loss, params, train_x, train_y, test_x[incident], test_y[incident], rows,
                                l2=L2, tol=1e-5, maxiter=1000)
    retrained = retrain_without(train, N_TRAIN, rows, optimum)
    with jax.enable_x64(True):
        tx = jnp.asarray(test_x[incident : incident + 1], jnp.float64)
        ty = jnp.asarray(test_y[incident : incident + 1])
        base = float(linear_loss(optimum, tx, ty)[0])
        actual = np.array([float(linear_loss(p, tx, ty)[0]) - base for p, _ in retrained])
    return {
        "report": report, "rows": rows, "newton": newton, "actual": actual, "gradient_norm": gradient_norm,
        "retrain_norms": [norm for _, norm in retrained],
    }


def test_retraining_reaches_tight_convergence(loo_case):
    assert loo_case["gradient_norm"] < 1e-10
    assert max(loo_case["retrain_norms"]) < 1e-10


def test_solve_converged(loo_case):
    assert loo_case["report"].converged
    assert loo_case["report"].damping == 0.0


def test_first_order_correlates_but_underestimates(loo_case):
    figures = fidelity_figures(loo_case["report"].scores[loo_case["rows"]], loo_case["actual"])

    assert figures.pearson > 0.97
    assert figures.slope > 1.1


def test_newton_correction_meets_goal(loo_case):
    figures = fidelity_figures(loo_case["newton"].effects, loo_case["actual"])

    assert loo_case["newton"].converged.all()
    assert figures.pearson >= 0.99
    assert 0.8 <= figures.slope <= 1.25


def test_fidelity_figures_reject_short_input():
    with pytest.raises(ValueError, match=r"k >= 3"):
        fidelity_figures(np.ones(2), np.ones(2))
