"""Influence of training examples on one misclassified input.

The training objective is empirical risk over N examples plus an L2 term,

    J(θ) = (1/N) Σ_i loss(θ, x_i, y_i) + (l2/2)·||θ||²,

with Hessian H at the trained parameters θ*. Removing a training example z
moves the minimiser by about Δθ = (1/N)·H⁻¹∇loss(z), to first order (the
influence-function approximation). The incident's loss under its true label
then changes by about

    score(z) = (1/N)·∇loss_test·H⁻¹∇loss(z).

Sign convention: the score is the predicted change of the incident's
true-label loss if z were removed from the training set. A negative score means
that removing z would lower that loss, so z pushed the model toward the wrong
class, and the most negative score ranks first (see :func:`top_k`).

Computing it costs one inverse-Hessian-vector product, s = (H + λI)⁻¹∇loss_test
by conjugate gradient (:func:`cg`), plus one forward-mode pass over the
training set, because score(z) = (1/N)·∇loss(z)·s is the directional derivative
of z's loss along s. No per-example gradient is ever formed. The damping λ
makes CG usable on non-convex models, whose Hessian can have negative eigenvalues.

Training sets are read in batches of one fixed padded shape, so each jitted
per-batch function compiles once per loss function and batch shape, and the
arrays may be ``np.memmap`` files larger than memory.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Params = Any  # a pytree of arrays
Array = Any  # a jax.Array or a numpy array, np.memmap included
LossFn = Callable[[Params, Array, Array], Array]


class CGResult(NamedTuple):
    """The outcome of :func:`cg`.

    Attributes:
        x: the last accepted iterate, a pytree shaped like ``b``.
        iterations: int32 scalar, the number of CG steps taken. A step along
            a direction of non-positive curvature is not taken or counted.
        residual: float scalar, ``||b - A x|| / ||b||`` computed with one extra
            application of ``A`` after the last step, so it does not inherit
            the rounding drift of the recursive residual.
        converged: bool scalar, ``residual <= tol``.
        negative_curvature: bool scalar, True when a search direction ``p`` had
            ``p·Ap <= 0``, which means ``A`` is not positive definite.
    """

    x: Params
    iterations: jax.Array
    residual: jax.Array
    converged: jax.Array
    negative_curvature: jax.Array


class InfluenceReport(NamedTuple):
    """The scores of one incident and the health of the solve behind them.

    Attributes:
        scores: float32 ``(N,)``, the predicted change of the incident's
            true-label loss if each training example were removed.
        iterations: CG steps taken.
        residual: the explicit relative residual of the inverse-HVP solve.
        converged: whether ``residual <= tol``. Rankings from an unconverged
            solve are unreliable.
        negative_curvature: whether CG met a direction of non-positive
            curvature, so ``H + damping·I`` is indefinite at these parameters.
        damping: the damping added to the Hessian.
    """

    scores: np.ndarray
    iterations: int
    residual: float
    converged: bool
    negative_curvature: bool
    damping: float


# Validation, outside jit.


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"invalid {name}={value!r}: expected an integer >= 1")


def _check_nonnegative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float, np.number)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"invalid {name}={value!r}: expected a finite number >= 0")


def _check_tol(tol: float) -> None:
    if not (isinstance(tol, (int, float, np.number)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"invalid tol={tol!r}: expected a finite number > 0")


def _check_training_set(x: Array, y: Array) -> int:
    """Check that ``x`` is ``(N, ...)`` and ``y`` is ``(N,)`` with N >= 1, and return N."""
    if np.ndim(x) < 1 or len(x) == 0:
        raise ValueError(f"invalid training inputs of shape {np.shape(x)}: expected (N, *input_shape) with N >= 1")
    if np.ndim(y) != 1 or len(y) != len(x):
        raise ValueError(f"invalid training labels of shape {np.shape(y)}: expected ({len(x)},) to match the inputs")
    return len(x)


# Pytree arithmetic for CG, jitted once per pytree structure.


@jax.jit
def _tree_vdot(a: Params, b: Params) -> jax.Array:
    products = [jnp.vdot(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]
    return functools.reduce(jnp.add, products)


@jax.jit
def _tree_sub(a: Params, b: Params) -> Params:
    return jax.tree.map(jnp.subtract, a, b)


@jax.jit
def _cg_step(x: Params, r: Params, p: Params, Ap: Params, rs: jax.Array):
    """Take one CG step along ``p``. The caller discards it if ``p·Ap <= 0``."""
    curvature = _tree_vdot(p, Ap)
    alpha = rs / curvature
    x = jax.tree.map(lambda u, v: u + alpha * v, x, p)
    r = jax.tree.map(lambda u, v: u - alpha * v, r, Ap)
    rs_next = _tree_vdot(r, r)
    beta = rs_next / rs
    p = jax.tree.map(lambda u, v: u + beta * v, r, p)
    return x, r, p, rs_next, curvature


def cg(
    A: Callable[[Params], Params],
    b: Params,
    x0: Params | None = None,
    *,
    tol: float = 1e-5,
    maxiter: int = 100,
) -> CGResult:
    """Solve ``A x = b`` by conjugate gradient on pytrees.

    ``A`` is called from a Python loop, once per step, once more at the start
    when ``x0`` is given and once at the end for the explicit residual. It can
    therefore loop over batches of data on the host and need not be traceable.
    The vector arithmetic between calls is jitted.

    CG is only guaranteed to converge for a symmetric positive definite ``A``.
    When a search direction has ``p·Ap <= 0`` the operator is indefinite (or
    singular along ``p``), so CG stops, keeps the previous iterate and sets
    ``negative_curvature``. Adding damping to ``A`` is the usual remedy.
    CG also stops when the recursive residual satisfies
    ``||r|| <= tol·||b||``, after ``maxiter`` steps, or when ``p·Ap`` is NaN
    or inf, again keeping the previous iterate. Because the recursive
    residual drifts from the true one in floating point, ``converged`` is
    decided on ``||b - A x|| / ||b||`` computed afresh.

    Args:
        A: a linear operator mapping a pytree shaped like ``b`` to another.
        b: the right-hand side, a pytree of float arrays.
        x0: the initial guess, shaped like ``b``. Defaults to zeros.
        tol: relative residual tolerance, > 0.
        maxiter: maximum number of CG steps, >= 1.

    Returns:
        A :class:`CGResult`. If ``b`` is zero the solution is zero, with
        ``iterations = 0`` and ``residual = 0``.

    Raises:
        ValueError: if ``tol`` or ``maxiter`` is out of range.
    """
    _check_tol(tol)
    _check_positive_int("maxiter", maxiter)

    b_norm = float(jnp.sqrt(_tree_vdot(b, b)))
    if b_norm == 0.0:
        zeros = jax.tree.map(jnp.zeros_like, b)
        return _cg_result(zeros, 0, 0.0, tol, False)

    if x0 is None:
        x = jax.tree.map(jnp.zeros_like, b)
        r = b
    else:
        x = x0
        r = _tree_sub(b, A(x0))
    p = r
    rs = _tree_vdot(r, r)
    rs_host = float(rs)

    iterations = 0
    negative_curvature = False
    while iterations < maxiter and math.sqrt(rs_host) > tol * b_norm:
        x_next, r_next, p_next, rs_next, curvature = _cg_step(x, r, p, A(p), rs)
        curvature, rs_next_host = jax.device_get((curvature, rs_next))
        if curvature <= 0.0:
            negative_curvature = True
            break
        if not math.isfinite(curvature):
            # A returned NaN or inf. The explicit residual below reports it.
            break
        x, r, p, rs, rs_host = x_next, r_next, p_next, rs_next, float(rs_next_host)
        iterations += 1

    true_residual = _tree_sub(b, A(x))
    residual = float(jnp.sqrt(_tree_vdot(true_residual, true_residual))) / b_norm
    return _cg_result(x, iterations, residual, tol, negative_curvature)


def _cg_result(x: Params, iterations: int, residual: float, tol: float, negative_curvature: bool) -> CGResult:
    return CGResult(
        x=x,
        iterations=jnp.asarray(iterations, dtype=jnp.int32),
        residual=jnp.asarray(residual, dtype=jnp.result_type(float)),
        converged=jnp.asarray(residual <= tol),
        negative_curvature=jnp.asarray(negative_curvature),
    )


# Passes over the training set.


def _padded_batches(x: Array, y: Array, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(x_batch, y_batch, mask)`` with leading axis ``batch_size``.

    The last batch is padded with copies of its final real row rather than
    zeros, so the padding's losses and derivatives stay finite. ``mask`` is a
    bool ``(batch_size,)`` array that is True for real rows.
    """
    n = len(x)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        x_batch = np.asarray(x[start:stop])
        y_batch = np.asarray(y[start:stop])
        padding = batch_size - (stop - start)
        if padding:
            x_batch = np.concatenate([x_batch, np.repeat(x_batch[-1:], padding, axis=0)])
            y_batch = np.concatenate([y_batch, np.repeat(y_batch[-1:], padding, axis=0)])
        yield x_batch, y_batch, np.arange(batch_size) < stop - start


# The loss function is a static argument, so a model version's loss compiles
# once per batch shape and stays cached across incidents. It must therefore be
# hashable, which plain functions and closures are. NOTE: jax's jit cache keeps
# a reference to every loss object it has seen, so callers should reuse one loss
# per model version instead of building a new closure for each incident.


@functools.partial(jax.jit, static_argnums=0)
def _add_batch_hvp(loss: LossFn, total: Params, params: Params, v: Params, x, y, mask) -> Params:
    def batch_loss(theta: Params) -> jax.Array:
        return jnp.sum(jnp.where(mask, loss(theta, x, y), 0.0))

    _, hv = jax.jvp(jax.grad(batch_loss), (params,), (v,))
    return jax.tree.map(jnp.add, total, hv)


@jax.jit
def _finish_hvp(total: Params, v: Params, scale: float, shift: float) -> Params:
    return jax.tree.map(lambda t, u: scale * t + shift * u, total, v)


@functools.partial(jax.jit, static_argnums=0)
def _batch_directional_derivatives(loss: LossFn, params: Params, direction: Params, x, y) -> jax.Array:
    _, tangents = jax.jvp(lambda theta: loss(theta, x, y), (params,), (direction,))
    return tangents


@functools.partial(jax.jit, static_argnums=0)
def _example_gradient(loss: LossFn, params: Params, x, y) -> Params:
    return jax.grad(lambda theta: loss(theta, x[None], y[None])[0])(params)


def make_objective_hvp(
    loss: LossFn,
    params: Params,
    x: Array,
    y: Array,
    *,
    l2: float = 0.0,
    damping: float = 0.0,
    batch_size: int = 256,
) -> Callable[[Params], Params]:
    """Build ``v -> (H + damping·I) v`` for the training objective at ``params``.

    H is the Hessian of ``J(θ) = mean_i loss(θ, x_i, y_i) + (l2/2)·||θ||²``.
    Each product runs forward-over-reverse differentiation (``jax.jvp`` of
    ``jax.grad``) over the training set in jitted batches of
    ``min(batch_size, N)`` rows, with the last batch padded and masked.

    Args:
        loss: per-example loss, ``loss(params, x (B, ...), y (B,)) -> (B,)``.
        params: the parameters to expand around, a pytree.
        x: training inputs ``(N, *input_shape)``, numpy or ``np.memmap``.
        y: integer training labels ``(N,)``.
        l2: the objective's L2 coefficient, >= 0.
        damping: added to every eigenvalue of H, >= 0.
        batch_size: rows per batch, >= 1.

    Returns:
        A function from a pytree shaped like ``params`` to another. Every call
        reads the whole training set once.

    Raises:
        ValueError: if an argument is out of range or ``x`` and ``y`` disagree.
    """
    _check_nonnegative("l2", l2)
    _check_nonnegative("damping", damping)
    _check_positive_int("batch_size", batch_size)
    n = _check_training_set(x, y)
    batch_size = min(batch_size, n)

    def hvp(v: Params) -> Params:
        v = jax.tree.map(lambda u, theta: jnp.asarray(u, dtype=theta.dtype), v, params)
        total = jax.tree.map(jnp.zeros_like, params)
        for x_batch, y_batch, mask in _padded_batches(x, y, batch_size):
            total = _add_batch_hvp(loss, total, params, v, x_batch, y_batch, mask)
        return _finish_hvp(total, v, 1.0 / n, l2 + damping)

    return hvp


def incident_gradient(loss: LossFn, params: Params, x: Array, y: Array) -> Params:
    """Differentiate the loss of one example with respect to ``params``.

    Args:
        loss: per-example loss, ``loss(params, x (B, ...), y (B,)) -> (B,)``.
        params: a pytree.
        x: one input, shape ``input_shape`` with no batch axis.
        y: its true label, an integer scalar.

    Returns:
        A pytree shaped like ``params``.
    """
    return _example_gradient(loss, params, jnp.asarray(x), jnp.asarray(y))


def score_training_examples(
    loss: LossFn,
    params: Params,
    direction: Params,
    x: Array,
    y: Array,
    *,
    batch_size: int = 256,
) -> np.ndarray:
    """Score every training example by its loss's derivative along ``direction``.

    ``score_i = (1/N)·d/dε loss(params + ε·direction, x_i, y_i)`` at ε = 0,
    one forward-mode pass per batch of ``min(batch_size, N)`` rows.

    Args:
        loss: per-example loss, ``loss(params, x (B, ...), y (B,)) -> (B,)``.
        params: a pytree.
        direction: a pytree shaped like ``params``, usually the inverse-HVP.
        x: training inputs ``(N, *input_shape)``, numpy or ``np.memmap``.
        y: integer training labels ``(N,)``.
        batch_size: rows per batch, >= 1.

    Returns:
        float32 ``(N,)``.

    Raises:
        ValueError: if ``batch_size`` is out of range or ``x`` and ``y`` disagree.
    """
    _check_positive_int("batch_size", batch_size)
    n = _check_training_set(x, y)
    batch_size = min(batch_size, n)

    derivatives = []
    for x_batch, y_batch, mask in _padded_batches(x, y, batch_size):
        batch = _batch_directional_derivatives(loss, params, direction, x_batch, y_batch)
        derivatives.append((batch, int(mask.sum())))
    scores = np.concatenate([np.asarray(batch)[:rows] for batch, rows in derivatives])
    return (scores / n).astype(np.float32)


def compute_influence(
    loss: LossFn,
    params: Params,
    train_x: Array,
    train_y: Array,
    test_x: Array,
    test_y: Array,
    *,
    l2: float = 0.0,
    damping: float = 0.01,
    tol: float = 1e-5,
    maxiter: int = 200,
    batch_size: int = 256,
) -> InfluenceReport:
    """Score every training example's influence on one incident.

    Solves ``s = (H + damping·I)⁻¹ ∇loss(test_x, test_y)`` with :func:`cg`,
    then scores the training set along ``s`` with
    :func:`score_training_examples`. An unconverged or indefinite solve is
    reported in the result, not raised.

    Args:
        loss: per-example loss, ``loss(params, x (B, ...), y (B,)) -> (B,)``.
        params: the trained parameters, a pytree.
        train_x: training inputs ``(N, *input_shape)``, numpy or ``np.memmap``.
        train_y: integer training labels ``(N,)``.
        test_x: the incident's input, shape ``input_shape``.
        test_y: the incident's true label, an integer scalar.
        l2: the training objective's L2 coefficient, >= 0.
        damping: added to every eigenvalue of H, >= 0.
        tol: CG relative residual tolerance, > 0.
        maxiter: maximum number of CG steps, >= 1.
        batch_size: training rows per batch, >= 1.

    Returns:
        An :class:`InfluenceReport`.

    Raises:
        ValueError: if an argument is out of range or the shapes disagree.
        FloatingPointError: if the solve or the scores contain NaN or inf.
    """
    _check_tol(tol)
    _check_positive_int("maxiter", maxiter)
    hvp = make_objective_hvp(loss, params, train_x, train_y, l2=l2, damping=damping, batch_size=batch_size)
    if np.shape(test_x) != np.shape(train_x)[1:]:
        raise ValueError(
            f"invalid test_x of shape {np.shape(test_x)}: "
            f"expected {np.shape(train_x)[1:]}, one training input without the batch axis"
        )

    gradient = incident_gradient(loss, params, test_x, test_y)
    if not _tree_is_finite(gradient):
        raise FloatingPointError(
            "the incident's loss gradient contains NaN or inf; check the parameters and the incident's input"
        )

    solve = cg(hvp, gradient, tol=tol, maxiter=maxiter)
    if not (_tree_is_finite(solve.x) and math.isfinite(float(solve.residual))):
        raise FloatingPointError(
            f"the inverse-HVP solve contains NaN or inf after {int(solve.iterations)} CG steps; "
            "check the training loss for NaN or inf at these parameters"
        )

    scores = score_training_examples(loss, params, solve.x, train_x, train_y, batch_size=batch_size)
    if not np.all(np.isfinite(scores)):
        bad = np.flatnonzero(~np.isfinite(scores))
        raise FloatingPointError(
            f"influence scores of {bad.size} training examples are NaN or inf, the first at index {bad[0]}; "
            "check those training inputs for NaN or inf"
        )

    return InfluenceReport(
        scores=scores,
        iterations=int(solve.iterations),
        residual=float(solve.residual),
        converged=bool(solve.converged),
        negative_curvature=bool(solve.negative_curvature),
        damping=float(damping),
    )


def _tree_is_finite(tree: Params) -> bool:
    return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(tree))


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Return the indices of the ``k`` most negative scores, most negative first.

    Equal scores keep index order.

    Args:
        scores: ``(N,)`` without NaN.
        k: how many indices, ``1 <= k <= N``.

    Returns:
        int64 ``(k,)``.

    Raises:
        ValueError: if ``k`` is out of range, ``scores`` is not 1-D, or it contains NaN.
    """
    scores = np.asarray(scores)
    if scores.ndim != 1:
        raise ValueError(f"invalid scores of shape {scores.shape}: expected (N,)")
    if np.isnan(scores).any():
        raise ValueError(f"invalid scores: {int(np.isnan(scores).sum())} NaN values cannot be ranked")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= scores.size:
        raise ValueError(f"invalid k={k!r}: expected an integer with 1 <= k <= N = {scores.size}")
    return np.argsort(scores, kind="stable")[:k].astype(np.int64)
