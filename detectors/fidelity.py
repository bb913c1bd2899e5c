"""Leave-one-out ground truth for checking influence against actual retraining.

Influence predicts how the incident's loss would change if one training
example were removed. :func:`retrain_without` measures it: it retrains in
float64 with the example's weight set to zero, warm-started at the trained
parameters, by Newton's method with the dense Hessian until the gradient norm
is below ``gtol``. The dense Hessian limits it to models with a few thousand
parameters, which is what a fidelity check needs. :func:`fidelity_figures`
compares predicted with actual effects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

Params = Any
LossFn = Callable[[Params, Any, Any], jax.Array]


class FidelityFigures(NamedTuple):
    """Agreement of predicted leave-one-out effects with actual ones.

    Attributes:
        pearson: Pearson correlation of predicted and actual effects.
        slope: least-squares slope of actual on predicted (with intercept);
            1 means the predictions have the right scale, above 1 that they
            underestimate.
        slope_through_origin: the slope of the fit without intercept.
        spearman: rank correlation.
        count: number of examples compared.
    """

    pearson: float
    slope: float
    slope_through_origin: float
    spearman: float
    count: int


def fidelity_figures(predicted: np.ndarray, actual: np.ndarray) -> FidelityFigures:
    """Compare predicted and actual effects, both ``(k,)`` with k >= 3."""
    predicted = np.asarray(predicted, np.float64)
    actual = np.asarray(actual, np.float64)
    if predicted.shape != actual.shape or predicted.ndim != 1 or predicted.size < 3:
        raise ValueError(f"invalid effects of shapes {predicted.shape} and {actual.shape}: expected equal (k,) with k >= 3")
    slope = float(np.polyfit(predicted, actual, 1)[0])
    through_origin = float(predicted @ actual / (predicted @ predicted))
    ranks = [np.argsort(np.argsort(values)) for values in (predicted, actual)]
    return FidelityFigures(
        pearson=float(np.corrcoef(predicted, actual)[0, 1]),
        slope=slope,
        slope_through_origin=through_origin,
        spearman=float(np.corrcoef(*ranks)[0, 1]),
        count=int(predicted.size),
    )


def make_newton_trainer(loss: LossFn, params: Params, x, y, *, l2: float, max_steps: int = 50, gtol: float = 1e-10):
    """Build ``train(weights, start) -> (params, gradient norm)`` that minimises a weighted objective in float64.

    The objective is ``Σ_i w_i loss_i(θ) / Σ_i w_i + (l2/2)·||θ||²``, so a zero
    weight removes an example and the mean runs over the remaining ones. Call
    the trainer, and use what it returns, inside ``jax.enable_x64(True)``.

    Args:
        loss: per-example loss.
        params: a pytree giving the parameter layout.
        x: training inputs ``(N, ...)``, held in memory.
        y: integer labels ``(N,)``.
        l2: the L2 coefficient.
        max_steps: Newton steps at most.
        gtol: stop when the gradient norm is below this.
    """
    with jax.enable_x64(True):
        flat, unravel = ravel_pytree(jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float64), params))
        x64 = jnp.asarray(np.asarray(x), jnp.float64)
        y64 = jnp.asarray(np.asarray(y))

    def objective(theta, weights):
        losses = loss(unravel(theta), x64, y64)
        return jnp.sum(weights * losses) / jnp.sum(weights) + 0.5 * l2 * theta @ theta

    gradient_fn = jax.jit(jax.grad(objective))
    hessian_fn = jax.jit(jax.hessian(objective))

    objective_fn = jax.jit(objective)

    def train(weights, start):
        with jax.enable_x64(True):
            theta = ravel_pytree(jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float64), start))[0]
            weights = jnp.asarray(weights, jnp.float64)
            identity = jnp.eye(theta.shape[0])
            norm = np.inf
            for _ in range(max_steps):
                gradient = gradient_fn(theta, weights)
                norm = float(jnp.linalg.norm(gradient))
                if norm < gtol:
                    break
                theta = _safeguarded_step(objective_fn, theta, weights, gradient, hessian_fn(theta, weights), identity)
            return unravel(theta), norm

    del flat
    return train


def _safeguarded_step(objective_fn, theta, weights, gradient, hessian, identity):
    """Take a Newton step, adding Levenberg-Marquardt damping until the objective decreases.

    Near a strict local minimum the plain step is taken and convergence is
    quadratic. Where the Hessian is indefinite (a non-convex model far from
    the minimum) the damping keeps the step a descent step.
    """
    current = float(objective_fn(theta, weights))
    damping = 0.0
    for _ in range(30):
        candidate = theta - jnp.linalg.solve(hessian + damping * identity, gradient)
        value = float(objective_fn(candidate, weights))
        if np.isfinite(value) and value <= current + 1e-15 * abs(current):
            return candidate
        damping = max(10.0 * damping, 1e-6)
    return theta


def retrain_without(train, n: int, rows, start: Params) -> list[tuple[Params, float]]:
    """Retrain once per row with that row's weight set to zero, warm-started at ``start``.

    Returns:
        One ``(params, final gradient norm)`` per row, params in float64.
    """
    results = []
    for row in np.asarray(rows).tolist():
        weights = np.ones(n)
        weights[row] = 0.0
        results.append(train(weights, start))
    return results
