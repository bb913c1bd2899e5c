"""Leave-one-out effects refined by one Newton step, for the top candidates.

First-order influence underestimates large leave-one-out effects, for two
reasons: it keeps the full-data Hessian, although the removed example's own
curvature ``H_z`` leaves with it (high-leverage examples carry much of H), and
it treats the incident's loss as linear in the parameters. On L2-regularised
logistic regression on digits the actual effects of the most influential
examples are 1.2 to 3 times the first-order prediction.

:func:`newton_loo_effects` removes both errors for a few candidates. For the
objective without z, with the mean over the remaining N - 1 examples as a
real retraining takes it,

    J₋z(θ) = 1/(N-1) Σ_{i≠z} loss_i(θ) + (l2/2)·||θ||²,

it takes one Newton step from θ*: ``Δθ = -(∇²J₋z(θ*) + λI)⁻¹ ∇J₋z(θ*)``, solved
by CG with ``∇²J₋z v = (N·H_data v - H_z v)/(N-1) + l2·v``. Then it evaluates
the incident's loss at ``θ* + Δθ`` exactly. The gradient ``∇J₋z(θ*)`` includes
the shift from renormalising the mean, ``l2·θ*/(N-1)``, which first-order
influence leaves out. Each candidate costs one CG solve (tens of HVP passes),
so this refines a top-k list, never the whole training set.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from detectors.batching import padded_batches
from detectors.influence import incident_gradient, make_objective_hvp
from detectors.solvers import cg, check_nonnegative, check_positive_int

Params = Any
LossFn = Callable[[Params, Any, Any], jax.Array]


class NewtonEffects(NamedTuple):
    """Refined leave-one-out effects of some training examples on one incident.

    Attributes:
        indices: int64 ``(k,)``, the training rows refined.
        effects: float64 ``(k,)``, the predicted change of the incident's loss if
            each row were removed (same sign convention as influence scores).
        residuals: float64 ``(k,)``, the CG relative residual of each Newton step.
        converged: bool ``(k,)``, whether each residual met the tolerance.
        extra_damping: float64 ``(k,)``, damping added to a step whose first
            solve did not converge (negative curvature after removing z); 0 otherwise.
    """

    indices: np.ndarray
    effects: np.ndarray
    residuals: np.ndarray
    converged: np.ndarray
    extra_damping: np.ndarray


@functools.partial(jax.jit, static_argnums=0)
def _add_batch_gradient(loss: LossFn, total: Params, params: Params, x, y, mask) -> Params:
    gradient = jax.grad(lambda theta: jnp.sum(jnp.where(mask, loss(theta, x, y), 0.0)))(params)
    return jax.tree.map(jnp.add, total, gradient)


@functools.partial(jax.jit, static_argnums=0)
def _example_hvp(loss: LossFn, params: Params, v: Params, x, y) -> Params:
    def example_loss(theta):
        return loss(theta, x[None], y[None])[0]

    return jax.jvp(jax.grad(example_loss), (params,), (v,))[1]


@functools.partial(jax.jit, static_argnums=0)
def _example_loss(loss: LossFn, params: Params, x, y) -> jax.Array:
    return loss(params, x[None], y[None])[0]


def mean_data_gradient(loss: LossFn, params: Params, x, y, *, batch_size: int = 256) -> Params:
    """Return ``(1/N) Σ_i ∇loss_i(params)`` in one pass over the training set."""
    check_positive_int("batch_size", batch_size)
    n = len(x)
    total = jax.tree.map(jnp.zeros_like, params)
    for x_batch, y_batch, mask in padded_batches(x, y, min(batch_size, n)):
        total = _add_batch_gradient(loss, total, params, x_batch, y_batch, mask)
    return jax.tree.map(lambda leaf: leaf / n, total)


def newton_loo_effects(
    loss: LossFn,
    params: Params,
    x,
    y,
    test_x,
    test_y,
    candidates,
    *,
    l2: float,
    damping: float = 0.0,
    tol: float = 1e-6,
    maxiter: int = 500,
    batch_size: int = 256,
) -> NewtonEffects:
    """Predict the leave-one-out effect of each candidate by one Newton step (see the module docstring).

    Args:
        loss: per-example loss, ``loss(params, x (B, ...), y (B,)) -> (B,)``.
        params: the trained parameters θ*.
        x: training inputs ``(N, *input_shape)``, N >= 2.
        y: integer training labels ``(N,)``.
        test_x: the incident's input, shape ``input_shape``.
        test_y: the incident's true label.
        candidates: training rows to refine, e.g. the top-k of the influence ranking.
        l2: the objective's L2 coefficient, >= 0.
        damping: added to the leave-one-out Hessian, >= 0; use the incident's
            damping for non-convex models.
        tol: CG tolerance of each Newton step.
        maxiter: CG steps per candidate.
        batch_size: rows per batch.

    Returns:
        :class:`NewtonEffects` in the order of ``candidates``.
    """
    check_nonnegative("l2", l2)
    check_nonnegative("damping", damping)
    n = len(x)
    if n < 2:
        raise ValueError(f"invalid training set of {n} examples: leave-one-out needs at least 2")
    candidates = np.asarray(candidates, np.int64).reshape(-1)
    if candidates.size and (candidates.min() < 0 or candidates.max() >= n):
        raise ValueError(f"invalid candidates: rows must lie in [0, {n}), got [{candidates.min()}, {candidates.max()}]")

    shift = l2 + damping
    full_hvp = make_objective_hvp(loss, params, x, y, l2=l2, damping=damping, batch_size=batch_size)
    data_gradient = mean_data_gradient(loss, params, x, y, batch_size=batch_size)
    test_x, test_y = jnp.asarray(test_x), jnp.asarray(test_y)
    base_loss = float(_example_loss(loss, params, test_x, test_y))
    ratio = n / (n - 1)

    effects, residuals, converged, extra_damping = [], [], [], []
    for row in candidates.tolist():
        xz, yz = jnp.asarray(np.asarray(x[row])), jnp.asarray(np.asarray(y[row]))
        gz = incident_gradient(loss, params, xz, yz)
        # ∇J₋z(θ*) = N/(N-1)·mean gradient - g_z/(N-1) + l2·θ*.
        gradient = jax.tree.map(
            lambda mean, g, theta: ratio * mean - g / (n - 1) + l2 * theta, data_gradient, gz, params
        )

        def loo_hvp(v, xz=xz, yz=yz):
            full = full_hvp(v)
            hz = _example_hvp(loss, params, v, xz, yz)
            return jax.tree.map(lambda f, h, u: ratio * (f - shift * u) - h / (n - 1) + shift * u, full, hz, v)

        target = jax.tree.map(jnp.negative, gradient)
        step = cg(loo_hvp, target, tol=tol, maxiter=maxiter)
        if not bool(step.converged):
            # Removing z can leave an indefinite Hessian on a non-convex model.
            # Retry with damping chosen from the spectrum of that Hessian.
            step = cg(loo_hvp, target, tol=tol, maxiter=maxiter, damping=None)
        moved = jax.tree.map(jnp.add, params, step.x)
        effects.append(float(_example_loss(loss, moved, test_x, test_y)) - base_loss)
        residuals.append(float(step.residual))
        converged.append(bool(step.converged))
        extra_damping.append(step.damping)

    return NewtonEffects(
        indices=candidates,
        effects=np.asarray(effects, np.float64),
        residuals=np.asarray(residuals, np.float64),
        converged=np.asarray(converged, bool),
        extra_damping=np.asarray(extra_damping, np.float64),
    )
