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

Computing it costs one inverse-Hessian-vector product, s = (H + λI)⁻¹∇loss_test,
plus one forward-mode pass over the training set, because
score(z) = (1/N)·∇loss(z)·s is the directional derivative of z's loss along s.
No per-example gradient is ever formed. The damping λ makes the solve usable
on non-convex models, whose Hessian can have negative eigenvalues. The solve
is conjugate gradient (:func:`detectors.solvers.cg`), LiSSA
(:func:`detectors.solvers.lissa`) or the per-version low-rank factors of
:mod:`detectors.factors`; H is the exact Hessian or its Gauss-Newton
approximation (:func:`make_gauss_newton_hvp`, positive semi-definite).

Training sets are read in batches of one fixed padded shape
(:mod:`detectors.batching`). Each jitted per-batch function therefore
compiles once per loss function and batch shape. The arrays may be
``np.memmap`` files larger than memory, and a batch can be split over all
local devices.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from detectors.batching import fit_batch_size, padded_batches
from detectors.factors import HessianFactors, ResidualTreatment, apply_inverse
from detectors.solvers import (
    CGResult,
    cg,
    check_nonnegative,
    check_positive_int,
    check_tol,
    choose_damping,
    estimate_extreme_eigenvalues,
    lissa,
    relative_residual,
)

__all__ = [
    "CGResult",
    "HessianKind",
    "InfluenceReport",
    "SolverKind",
    "cg",
    "compute_influence",
    "incident_gradient",
    "make_gauss_newton_hvp",
    "make_objective_hvp",
    "score_training_examples",
    "top_k",
]

Params = Any  # a pytree of arrays
Array = Any  # a jax.Array or a numpy array, np.memmap included
LossFn = Callable[[Params, Array, Array], Array]
ApplyFn = Callable[[Params, Array], Array]
OutputLossFn = Callable[[Array, Array], Array]


class SolverKind(str, enum.Enum):
    """The inverse-HVP solver of :func:`compute_influence`."""

    CG = "cg"
    LISSA = "lissa"
    FACTORS = "factors"


class HessianKind(str, enum.Enum):
    """Curvature matrix that :func:`compute_influence` inverts."""

    EXACT = "exact"
    GAUSS_NEWTON = "gauss-newton"


class InfluenceReport(NamedTuple):
    """The scores of one incident and the health of the solve behind them.

    Attributes:
        scores: float32 ``(N,)``, the predicted change of the incident's
            true-label loss if each training example were removed.
        iterations: solver steps taken (0 for factors).
        residual: the explicit relative residual ``||g - (H + damping·I) s|| / ||g||``
            of the inverse-HVP solve; NaN when a factor solve skipped the check.
        converged: whether ``residual <= tol``. Rankings from an unconverged
            solve are unreliable, and no alert may claim a poison from them.
        negative_curvature: whether CG met a direction of non-positive
            curvature, so ``H + damping·I`` is indefinite at these parameters.
        damping: the damping added to the Hessian, chosen automatically when
            :func:`compute_influence` got ``damping=None``.
        solver: the :class:`SolverKind` value used.
        diverged: whether LiSSA diverged at every scale it tried.
        captured: for factor solves, the fraction of the incident gradient's
            norm inside the factors' span; 1.0 for the other solvers.
    """

    scores: np.ndarray
    iterations: int
    residual: float
    converged: bool
    negative_curvature: bool
    damping: float
    solver: str = SolverKind.CG.value
    diverged: bool = False
    captured: float = 1.0

    @property
    def reliable(self) -> bool:
        """Whether the ranking may be acted on: the solve converged without negative curvature or divergence."""
        return self.converged and not self.negative_curvature and not self.diverged


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


@functools.partial(jax.jit, static_argnums=(0, 1))
def _add_batch_gauss_newton(apply: ApplyFn, output_loss: OutputLossFn, total, params, v, x, y, mask) -> Params:
    logits, jacobian_v = jax.jvp(lambda theta: apply(theta, x), (params,), (v,))

    def batch_output_loss(z: jax.Array) -> jax.Array:
        return jnp.sum(jnp.where(mask, output_loss(z, y), 0.0))

    # The output loss's Hessian times J v, then Jᵀ of that: J_zᵀ H_out J_z v.
    _, curvature_v = jax.jvp(jax.grad(batch_output_loss), (logits,), (jacobian_v,))
    _, pullback = jax.vjp(lambda theta: apply(theta, x), params)
    return jax.tree.map(jnp.add, total, pullback(curvature_v)[0])


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy of ``(B, C)`` logits and ``(B,)`` integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _check_hvp_arguments(x: Array, y: Array, l2: float, damping: float, batch_size: int) -> int:
    check_nonnegative("l2", l2)
    check_nonnegative("damping", damping)
    check_positive_int("batch_size", batch_size)
    return _check_training_set(x, y)


def _check_training_set(x: Array, y: Array) -> int:
    """Check that ``x`` is ``(N, ...)`` and ``y`` is ``(N,)`` with N >= 1, and return N."""
    if np.ndim(x) < 1 or len(x) == 0:
        raise ValueError(f"invalid training inputs of shape {np.shape(x)}: expected (N, *input_shape) with N >= 1")
    if np.ndim(y) != 1 or len(y) != len(x):
        raise ValueError(f"invalid training labels of shape {np.shape(y)}: expected ({len(x)},) to match the inputs")
    return len(x)


def make_objective_hvp(
    loss: LossFn,
    params: Params,
    x: Array,
    y: Array,
    *,
    l2: float = 0.0,
    damping: float = 0.0,
    batch_size: int = 256,
    sharding: NamedSharding | None = None,
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
        batch_size: rows per batch, >= 1; rounded up to a multiple of the
            device count when ``sharding`` is given.
        sharding: from :func:`detectors.batching.data_sharding`, to split every
            batch over several devices. None runs on the default device.

    Returns:
        A function from a pytree shaped like ``params`` to another. Every call
        reads the whole training set once.

    Raises:
        ValueError: if an argument is out of range or ``x`` and ``y`` disagree.
    """
    n = _check_hvp_arguments(x, y, l2, damping, batch_size)
    batch_size = fit_batch_size(batch_size, n, sharding)

    add_batch = functools.partial(_add_batch_hvp, loss)
    return functools.partial(_batched_product, add_batch, params, x, y, n, l2 + damping, batch_size, sharding)


def _batched_product(add_batch, params: Params, x: Array, y: Array, n: int, shift: float, batch_size: int,
                     sharding: NamedSharding | None, v: Params) -> Params:
    """Compute ``(1/n)·Σ_batches add_batch(...) + shift·v``, one fixed-shape batch of the training set at a time."""
    v = jax.tree.map(lambda u, theta: jnp.asarray(u, dtype=theta.dtype), v, params)
    total = jax.tree.map(jnp.zeros_like, params)
    for x_batch, y_batch, mask in padded_batches(x, y, batch_size, sharding):
        total = add_batch(total, params, v, x_batch, y_batch, mask)
    return _finish_hvp(total, v, 1.0 / n, shift)


def make_gauss_newton_hvp(
    apply: ApplyFn,
    params: Params,
    x: Array,
    y: Array,
    *,
    output_loss: OutputLossFn = softmax_cross_entropy,
    l2: float = 0.0,
    damping: float = 0.0,
    batch_size: int = 256,
    sharding: NamedSharding | None = None,
) -> Callable[[Params], Params]:
    """Build ``v -> (G + (l2 + damping)·I) v`` with G the generalised Gauss-Newton matrix.

    ``G = (1/N) Σ_i J_iᵀ H_i J_i``, where ``J_i`` is the Jacobian of the logits
    ``apply(θ, x_i)`` with respect to θ and ``H_i`` the Hessian of
    ``output_loss`` with respect to the logits. For softmax cross-entropy
    ``H_i = diag(p_i) - p_i p_iᵀ`` is positive semi-definite, so G is too, and
    CG never meets negative curvature, even on a non-convex network. G equals
    the Fisher information matrix of the model's predictive distribution for
    this loss. It drops the second-derivative terms of the network, so
    influence from it is an approximation wherever those terms matter.

    Args:
        apply: ``apply(params, x (B, ...)) -> (B, C)`` logits.
        params: the parameters to expand around.
        x: training inputs ``(N, *input_shape)``.
        y: integer training labels ``(N,)``.
        output_loss: ``output_loss(logits (B, C), y (B,)) -> (B,)``, convex in the logits.
        l2: the objective's L2 coefficient, >= 0.
        damping: added to every eigenvalue, >= 0.
        batch_size: rows per batch, >= 1.
        sharding: as for :func:`make_objective_hvp`.

    Returns:
        A function from a pytree shaped like ``params`` to another.
    """
    n = _check_hvp_arguments(x, y, l2, damping, batch_size)
    batch_size = fit_batch_size(batch_size, n, sharding)

    add_batch = functools.partial(_add_batch_gauss_newton, apply, output_loss)
    return functools.partial(_batched_product, add_batch, params, x, y, n, l2 + damping, batch_size, sharding)


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
    sharding: NamedSharding | None = None,
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
        sharding: as for :func:`make_objective_hvp`.

    Returns:
        float32 ``(N,)``.

    Raises:
        ValueError: if ``batch_size`` is out of range or ``x`` and ``y`` disagree.
    """
    check_positive_int("batch_size", batch_size)
    n = _check_training_set(x, y)
    batch_size = fit_batch_size(batch_size, n, sharding)

    derivatives = []
    for x_batch, y_batch, mask in padded_batches(x, y, batch_size, sharding):
        batch = _batch_directional_derivatives(loss, params, direction, x_batch, y_batch)
        derivatives.append((batch, int(np.sum(mask))))
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
    damping: float | None = 0.01,
    tol: float = 1e-5,
    maxiter: int = 200,
    batch_size: int = 256,
    solver: SolverKind | str = SolverKind.CG,
    hessian: HessianKind | str = HessianKind.EXACT,
    apply: ApplyFn | None = None,
    factors: HessianFactors | None = None,
    residual_treatment: ResidualTreatment | str = ResidualTreatment.SMALLEST,
    check_residual: bool = True,
    lissa_scale: float = 1.0,
    sharding: NamedSharding | None = None,
) -> InfluenceReport:
    """Score every training example's influence on one incident.

    Solves ``s = (H + damping·I)⁻¹ ∇loss(test_x, test_y)`` with ``solver``,
    then scores the training set along ``s`` with
    :func:`score_training_examples`. An unconverged, indefinite or diverged
    solve is reported in the result, not raised.

    Args:
        loss: per-example loss, ``loss(params, x (B, ...), y (B,)) -> (B,)``.
        params: the trained parameters, a pytree.
        train_x: training inputs ``(N, *input_shape)``, numpy or ``np.memmap``.
        train_y: integer training labels ``(N,)``.
        test_x: the incident's input, shape ``input_shape``.
        test_y: the incident's true label, an integer scalar.
        l2: the training objective's L2 coefficient, >= 0.
        damping: added to every eigenvalue of H, >= 0. ``None`` chooses it from
            a few Lanczos steps (:func:`detectors.solvers.choose_damping`). Ignored
            by the factors solver, which uses the damping stored in ``factors``.
        tol: relative residual tolerance of the solve, > 0.
        maxiter: maximum CG steps, or LiSSA recursion depth, >= 1.
        batch_size: training rows per batch, >= 1.
        solver: :class:`SolverKind`. ``FACTORS`` needs ``factors``.
        hessian: :class:`HessianKind`. ``GAUSS_NEWTON`` needs ``apply`` and
            assumes ``loss`` is the softmax cross-entropy of ``apply``'s logits.
        apply: ``apply(params, x) -> logits``, for the Gauss-Newton Hessian.
        factors: per-version factors from :func:`detectors.factors.compute_factors`.
        residual_treatment: how the factors solver treats the residual subspace.
        check_residual: for the factors solver, whether to spend one HVP pass on
            the explicit residual. Without it ``residual`` is NaN and
            ``converged`` False, so the ranking counts as unreliable.
        lissa_scale: LiSSA's first scale; larger ones are tried after a divergence.
        sharding: from :func:`detectors.batching.data_sharding`.

    Returns:
        An :class:`InfluenceReport`.

    Raises:
        ValueError: if an argument is out of range or the shapes disagree.
        FloatingPointError: if the gradient, the solve or the scores contain NaN or inf.
    """
    check_tol(tol)
    check_positive_int("maxiter", maxiter)
    solver = SolverKind(solver)
    hessian = HessianKind(hessian)
    if solver is SolverKind.FACTORS and factors is None:
        raise ValueError("solver 'factors' needs the model version's factors; compute them with compute_factors")
    if hessian is HessianKind.GAUSS_NEWTON and apply is None:
        raise ValueError("hessian 'gauss-newton' needs apply(params, x) -> logits")
    if damping is not None:
        check_nonnegative("damping", damping)
    if np.shape(test_x) != np.shape(train_x)[1:]:
        raise ValueError(
            f"invalid test_x of shape {np.shape(test_x)}: "
            f"expected {np.shape(train_x)[1:]}, one training input without the batch axis"
        )
    _check_training_set(train_x, train_y)

    gradient = incident_gradient(loss, params, test_x, test_y)
    if not _tree_is_finite(gradient):
        raise FloatingPointError(
            "the incident's loss gradient contains NaN or inf; check the parameters and the incident's input"
        )

    def undamped_hvp() -> Callable[[Params], Params]:
        common = dict(l2=l2, batch_size=batch_size, sharding=sharding)
        if hessian is HessianKind.GAUSS_NEWTON:
            return make_gauss_newton_hvp(apply, params, train_x, train_y, **common)
        return make_objective_hvp(loss, params, train_x, train_y, **common)

    solve = _solve(solver, undamped_hvp, gradient, damping, tol, maxiter, factors,
                   ResidualTreatment(residual_treatment), check_residual, lissa_scale)
    residual_skipped = solver is SolverKind.FACTORS and not check_residual
    if not (_tree_is_finite(solve.x) and (solve.diverged or residual_skipped or math.isfinite(solve.residual))):
        raise FloatingPointError(
            f"the inverse-HVP solve contains NaN or inf after {solve.iterations} {solver.value} steps; "
            "check the training loss for NaN or inf at these parameters"
        )

    scores = score_training_examples(loss, params, solve.x, train_x, train_y, batch_size=batch_size, sharding=sharding)
    if not np.all(np.isfinite(scores)):
        bad = np.flatnonzero(~np.isfinite(scores))
        raise FloatingPointError(
            f"influence scores of {bad.size} training examples are NaN or inf, the first at index {bad[0]}; "
            "check those training inputs for NaN or inf"
        )
    return solve.report(scores, solver)


class _Solve(NamedTuple):
    x: Params
    iterations: int
    residual: float
    converged: bool
    negative_curvature: bool
    damping: float
    diverged: bool = False
    captured: float = 1.0

    def report(self, scores: np.ndarray, solver: SolverKind) -> InfluenceReport:
        return InfluenceReport(
            scores=scores,
            iterations=self.iterations,
            residual=self.residual,
            converged=self.converged,
            negative_curvature=self.negative_curvature,
            damping=self.damping,
            solver=solver.value,
            diverged=self.diverged,
            captured=self.captured,
        )


def _solve(solver, undamped_hvp, gradient, damping, tol, maxiter, factors, treatment, check_residual, lissa_scale):
    """Run one inverse-HVP solve of ``gradient`` and collect its diagnostics."""
    if solver is SolverKind.FACTORS:
        result = apply_inverse(factors, gradient, residual=treatment)
        residual = math.nan
        if check_residual:
            hvp = undamped_hvp()
            damped = lambda v: _finish_hvp(hvp(v), v, 1.0, factors.damping)  # noqa: E731
            residual = relative_residual(damped, gradient, result.x)
        converged = bool(residual <= tol)
        return _Solve(result.x, 0, residual, converged, False, factors.damping, captured=result.captured)

    hvp = undamped_hvp()
    if solver is SolverKind.LISSA:
        if damping is None:
            damping = choose_damping(*estimate_extreme_eigenvalues(hvp, gradient))
        result = lissa(hvp, gradient, damping=damping, scale=lissa_scale, depth=maxiter, tol=tol)
        return _Solve(result.x, result.iterations, result.residual, result.converged, False,
                      result.damping, diverged=result.diverged)

    result = cg(hvp, gradient, tol=tol, maxiter=maxiter, damping=damping)
    return _Solve(result.x, int(result.iterations), float(result.residual), bool(result.converged),
                  bool(result.negative_curvature), float(result.damping))


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
