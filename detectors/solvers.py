"""Inverse-Hessian-vector solvers that report whether they can be trusted.

Every solver here takes a linear operator ``A`` (a Python callable from a
pytree to a pytree of the same structure), a right-hand side ``b`` and
returns the solution together with its diagnostics: iterations, the explicit
relative residual ``||b - (A + damping·I) x|| / ||b||``, whether that residual
met ``tol``, and the damping that was used. A solve that did not converge is
returned, never raised, so the caller can store it as unreliable.

- :func:`cg`: conjugate gradient. It detects negative curvature, and with
  ``damping=None`` it chooses the damping from a few Lanczos steps.
- :func:`lissa`: the LiSSA recursion (Agarwal, Bullins and Hazan, 2017,
  "Second-Order Stochastic Optimization for Machine Learning in Linear Time")
  with divergence detection and an automatic search for its scale.
- :func:`lanczos` and :func:`estimate_extreme_eigenvalues`: a few Lanczos
  steps with full reorthogonalisation, on flat vectors.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

Params = Any  # a pytree of arrays
Operator = Callable[[Params], Params]

# Lanczos steps used to choose the damping when none is configured.
DAMPING_LANCZOS_STEPS = 12
# CG attempts with automatic damping: each one that meets negative curvature
# raises the damping past the curvature it found.
AUTO_DAMPING_RETRIES = 3
# The damped operator's smallest eigenvalue is kept at least this fraction of
# its largest, so its condition number stays below 1e4 and CG converges in a
# few hundred steps.
MIN_RELATIVE_EIGENVALUE = 1e-4


class CGResult(NamedTuple):
    """The outcome of :func:`cg`.

    Attributes:
        x: the last accepted iterate, a pytree shaped like ``b``.
        iterations: int32 scalar, the number of CG steps taken. A step along
            a direction of non-positive curvature is not taken or counted.
        residual: float scalar, ``||b - (A + damping·I) x|| / ||b||`` computed
            with one extra application of ``A`` after the last step, so it does
            not inherit the rounding drift of the recursive residual.
        converged: bool scalar, ``residual <= tol``.
        negative_curvature: bool scalar, True when a search direction ``p`` had
            ``p·(A + damping·I)p <= 0``, which means the damped operator is not
            positive definite.
        damping: the damping added to ``A``, chosen by
            :func:`choose_damping` when :func:`cg` was called with ``damping=None``.
    """

    x: Params
    iterations: jax.Array
    residual: jax.Array
    converged: jax.Array
    negative_curvature: jax.Array
    damping: float = 0.0


class LissaResult(NamedTuple):
    """The outcome of :func:`lissa`.

    Attributes:
        x: the solution estimate, shaped like ``b``. Zeros when every scale diverged.
        iterations: recursion steps of the last attempt.
        residual: ``||b - (A + damping·I) x|| / ||b||``; inf when every scale diverged.
        converged: ``residual <= tol``.
        diverged: True when the last attempt diverged, so ``x`` is not a solution.
        scale: the scale of the last attempt.
        attempts: how many scales were tried.
        damping: the damping added to ``A``.
    """

    x: Params
    iterations: int
    residual: float
    converged: bool
    diverged: bool
    scale: float
    attempts: int
    damping: float


class LanczosResult(NamedTuple):
    """A Lanczos tridiagonalisation ``Q A Qᵀ ≈ T`` on flat vectors.

    Attributes:
        alphas: float64 ``(m,)``, the diagonal of ``T``.
        betas: float64 ``(m,)``; ``betas[:-1]`` is the off-diagonal of ``T`` and
            ``betas[-1]`` the norm of the last unused residual.
        basis: float32 ``(m, P)``, orthonormal rows ``Q``.
    """

    alphas: np.ndarray
    betas: np.ndarray
    basis: jax.Array


# Validation, outside jit.


def check_positive_int(name: str, value: int) -> None:
    """Raise ValueError unless ``value`` is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"invalid {name}={value!r}: expected an integer >= 1")


def check_nonnegative(name: str, value: float) -> None:
    """Raise ValueError unless ``value`` is a finite number >= 0."""
    if not (isinstance(value, (int, float, np.number)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"invalid {name}={value!r}: expected a finite number >= 0")


def check_tol(tol: float) -> None:
    """Raise ValueError unless ``tol`` is a finite number > 0."""
    if not (isinstance(tol, (int, float, np.number)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"invalid tol={tol!r}: expected a finite number > 0")


# Pytree arithmetic, jitted once per pytree structure.


@jax.jit
def tree_vdot(a: Params, b: Params) -> jax.Array:
    """Return the inner product of two pytrees of the same structure."""
    products = [jnp.vdot(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]
    return functools.reduce(jnp.add, products)


@jax.jit
def _tree_sub(a: Params, b: Params) -> Params:
    return jax.tree.map(jnp.subtract, a, b)


@jax.jit
def _tree_axpy(alpha: jax.Array, x: Params, y: Params) -> Params:
    return jax.tree.map(lambda u, v: alpha * u + v, x, y)


def _damped(A: Operator, damping: float) -> Operator:
    if damping == 0.0:
        return A
    return lambda v: _tree_axpy(damping, v, A(v))


def _tree_norm(tree: Params) -> float:
    return float(jnp.sqrt(tree_vdot(tree, tree)))


def relative_residual(A: Operator, b: Params, x: Params, b_norm: float | None = None) -> float:
    """Return ``||b - A x|| / ||b||``, with one application of ``A``."""
    b_norm = _tree_norm(b) if b_norm is None else b_norm
    if b_norm == 0.0:
        return 0.0
    return _tree_norm(_tree_sub(b, A(x))) / b_norm


@jax.jit
def _cg_step(x: Params, r: Params, p: Params, Ap: Params, rs: jax.Array):
    """Take one CG step along ``p``. The caller discards it if ``p·Ap <= 0``."""
    curvature = tree_vdot(p, Ap)
    alpha = rs / curvature
    x = jax.tree.map(lambda u, v: u + alpha * v, x, p)
    r = jax.tree.map(lambda u, v: u - alpha * v, r, Ap)
    rs_next = tree_vdot(r, r)
    beta = rs_next / rs
    p = jax.tree.map(lambda u, v: u + beta * v, r, p)
    return x, r, p, rs_next, curvature


def cg(
    A: Operator,
    b: Params,
    x0: Params | None = None,
    *,
    tol: float = 1e-5,
    maxiter: int = 100,
    damping: float | None = 0.0,
) -> CGResult:
    """Solve ``(A + damping·I) x = b`` by conjugate gradient on pytrees.

    ``A`` is called from a Python loop, once per step, once more at the start
    when ``x0`` is given and once at the end for the explicit residual. It can
    therefore loop over batches of data on the host and need not be traceable.
    The vector arithmetic between calls is jitted.

    CG is only guaranteed to converge for a symmetric positive definite
    operator. When a search direction has ``p·Ap <= 0`` the operator is
    indefinite (or singular along ``p``), so CG stops, keeps the previous
    iterate and sets ``negative_curvature``. Adding damping is the usual remedy.
    CG also stops when the recursive residual satisfies
    ``||r|| <= tol·||b||``, after ``maxiter`` steps, or when ``p·Ap`` is NaN
    or inf, again keeping the previous iterate. Because the recursive
    residual drifts from the true one in floating point, ``converged`` is
    decided on ``||b - (A + damping·I) x|| / ||b||`` computed afresh.

    Args:
        A: a symmetric linear operator mapping a pytree shaped like ``b`` to another.
        b: the right-hand side, a pytree of float arrays.
        x0: the initial guess, shaped like ``b``. Defaults to zeros.
        tol: relative residual tolerance, > 0.
        maxiter: maximum number of CG steps, >= 1.
        damping: added to every eigenvalue of ``A``, >= 0. ``None`` chooses it
            with :func:`estimate_extreme_eigenvalues` and :func:`choose_damping`,
            which costs ``DAMPING_LANCZOS_STEPS`` extra applications of ``A``.
            If CG then meets negative curvature, it restarts with the damping
            raised by twice that direction's Rayleigh quotient, up to
            ``AUTO_DAMPING_RETRIES`` runs in all. ``negative_curvature`` then
            describes the last run.

    Returns:
        A :class:`CGResult`. If ``b`` is zero the solution is zero, with
        ``iterations = 0`` and ``residual = 0``.

    Raises:
        ValueError: if ``tol``, ``maxiter`` or ``damping`` is out of range.
    """
    check_tol(tol)
    check_positive_int("maxiter", maxiter)
    if damping is not None:
        check_nonnegative("damping", damping)
        return _cg_once(A, b, x0, tol, maxiter, float(damping))[0]

    lowest, highest = estimate_extreme_eigenvalues(A, b)
    damping = choose_damping(lowest, highest)
    for _ in range(AUTO_DAMPING_RETRIES):
        result, rayleigh = _cg_once(A, b, x0, tol, maxiter, damping)
        if not bool(result.negative_curvature):
            break
        # A few Lanczos steps can miss an isolated negative eigenvalue, but CG
        # just found a direction whose Rayleigh quotient bounds it from above.
        damping = damping - 2.0 * rayleigh + MIN_RELATIVE_EIGENVALUE * highest
    return result


def _cg_once(A, b, x0, tol, maxiter, damping) -> tuple[CGResult, float]:
    """Run CG on ``A + damping·I``; also return the Rayleigh quotient of a negative-curvature direction (else 0)."""
    A = _damped(A, damping)
    b_norm = _tree_norm(b)
    if b_norm == 0.0:
        zeros = jax.tree.map(jnp.zeros_like, b)
        return _cg_result(zeros, 0, 0.0, tol, False, damping), 0.0

    if x0 is None:
        x = jax.tree.map(jnp.zeros_like, b)
        r = b
    else:
        x = x0
        r = _tree_sub(b, A(x0))
    p = r
    rs = tree_vdot(r, r)
    rs_host = float(rs)

    iterations = 0
    negative_curvature = False
    rayleigh = 0.0
    while iterations < maxiter and math.sqrt(rs_host) > tol * b_norm:
        x_next, r_next, p_next, rs_next, curvature = _cg_step(x, r, p, A(p), rs)
        curvature, rs_next_host = jax.device_get((curvature, rs_next))
        if curvature <= 0.0:
            negative_curvature = True
            rayleigh = float(curvature) / float(tree_vdot(p, p))
            break
        if not math.isfinite(curvature):
            # A returned NaN or inf. The explicit residual below reports it.
            break
        x, r, p, rs, rs_host = x_next, r_next, p_next, rs_next, float(rs_next_host)
        iterations += 1

    residual = relative_residual(A, b, x, b_norm)
    return _cg_result(x, iterations, residual, tol, negative_curvature, damping), rayleigh


def _cg_result(
    x: Params, iterations: int, residual: float, tol: float, negative_curvature: bool, damping: float
) -> CGResult:
    return CGResult(
        x=x,
        iterations=jnp.asarray(iterations, dtype=jnp.int32),
        residual=jnp.asarray(residual, dtype=jnp.result_type(float)),
        converged=jnp.asarray(residual <= tol),
        negative_curvature=jnp.asarray(negative_curvature),
        damping=damping,
    )


# Lanczos on flat vectors.


def flat_operator(A: Operator, like: Params) -> tuple[Callable[[jax.Array], jax.Array], jax.Array, Callable]:
    """Wrap a pytree operator as one on flat vectors.

    Returns:
        ``(A_flat, flat_like, unravel)``: ``A_flat`` maps a ``(P,)`` vector to
        another, ``flat_like`` is ``like`` flattened and ``unravel`` maps back.
    """
    flat_like, unravel = ravel_pytree(like)

    def A_flat(v: jax.Array) -> jax.Array:
        return ravel_pytree(A(unravel(v)))[0]

    return A_flat, flat_like, unravel


@jax.jit
def _orthogonalize(w: jax.Array, basis: jax.Array, count: jax.Array) -> jax.Array:
    """Remove from ``w`` its components along the first ``count`` rows of ``basis``, twice."""
    mask = (jnp.arange(basis.shape[0]) < count)[:, None]
    active = jnp.where(mask, basis, 0.0)
    for _ in range(2):
        w = w - active.T @ (active @ w)
    return w


def lanczos(A_flat: Callable[[jax.Array], jax.Array], v0: jax.Array, num_steps: int) -> LanczosResult:
    """Run ``num_steps`` Lanczos steps of the symmetric operator ``A_flat`` from ``v0``.

    Every new vector is reorthogonalised twice against all previous ones, so
    the basis stays orthonormal in float32 and no spurious copies of converged
    eigenvalues appear. The basis is kept in memory: ``num_steps × P`` floats.
    The run stops early when the Krylov space becomes invariant.

    Args:
        A_flat: ``(P,) -> (P,)``, symmetric.
        v0: the start vector ``(P,)``, nonzero.
        num_steps: at most ``P`` steps, >= 1.

    Returns:
        A :class:`LanczosResult` with ``m <= num_steps`` rows.
    """
    check_positive_int("num_steps", num_steps)
    size = v0.shape[0]
    num_steps = min(num_steps, size)
    v0 = jnp.asarray(v0, jnp.float32)
    norm = float(jnp.linalg.norm(v0))
    if not (norm > 0.0 and math.isfinite(norm)):
        raise ValueError(f"invalid Lanczos start vector with norm {norm}: expected a finite nonzero vector")

    basis = jnp.zeros((num_steps, size), jnp.float32).at[0].set(v0 / norm)
    alphas, betas = [], []
    for step in range(num_steps):
        q = basis[step]
        w = A_flat(q)
        alpha = float(jnp.vdot(q, w))
        w = _orthogonalize(w, basis, jnp.asarray(step + 1))
        beta = float(jnp.linalg.norm(w))
        alphas.append(alpha)
        betas.append(beta)
        if step + 1 == num_steps:
            break
        if not beta > 1e-6 * max(abs(alpha), 1e-30):
            break  # invariant subspace found (or A returned NaN)
        basis = basis.at[step + 1].set(w / beta)
    m = len(alphas)
    return LanczosResult(np.asarray(alphas), np.asarray(betas), basis[:m])


def ritz_pairs(result: LanczosResult) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the Ritz values ``(m,)`` ascending, Ritz vectors ``(m, P)`` and their residual norms ``(m,)``.

    The residual norm of Ritz pair i is ``|β_m · s_{m,i}|``, a bound on
    ``||A u_i - θ_i u_i||`` that costs nothing extra.
    """
    m = len(result.alphas)
    tridiagonal = np.diag(result.alphas) + np.diag(result.betas[:-1], 1) + np.diag(result.betas[:-1], -1)
    values, vectors = np.linalg.eigh(tridiagonal.reshape(m, m))
    ritz_vectors = jnp.asarray(vectors.T, jnp.float32) @ result.basis
    residuals = np.abs(result.betas[-1] * vectors[-1, :])
    return values, ritz_vectors, residuals


def estimate_extreme_eigenvalues(
    A: Operator, like: Params, *, num_steps: int = DAMPING_LANCZOS_STEPS, seed: int = 0
) -> tuple[float, float]:
    """Estimate the smallest and largest eigenvalues of ``A`` with a few Lanczos steps.

    The start vector is Gaussian noise (from ``seed``), so every eigendirection
    is represented. Ritz values lie inside the spectrum: the smallest estimate
    is at least the true smallest eigenvalue and the largest at most the true
    largest. :func:`choose_damping` allows for that.

    Args:
        A: a symmetric pytree operator.
        like: a pytree shaped like ``A``'s argument.
        num_steps: Lanczos steps, >= 1; each applies ``A`` once.
        seed: seed of the start vector.

    Returns:
        ``(smallest, largest)`` Ritz values.
    """
    A_flat, flat_like, _ = flat_operator(A, like)
    start = jax.random.normal(jax.random.key(seed), flat_like.shape, jnp.float32)
    values, _, _ = ritz_pairs(lanczos(A_flat, start, num_steps))
    return float(values[0]), float(values[-1])


def choose_damping(
    smallest: float, largest: float, *, min_relative_eigenvalue: float = MIN_RELATIVE_EIGENVALUE
) -> float:
    """Choose a damping that makes an operator with this spectrum safe for CG.

    A few Lanczos steps overestimate the smallest eigenvalue, so a negative
    estimate is doubled before it is cancelled. Then the damped smallest
    eigenvalue is raised to ``min_relative_eigenvalue · largest`` if it is
    below. A well-conditioned positive definite operator gets no damping, so
    a convex model keeps its exact influence.

    Args:
        smallest: an estimate of the smallest eigenvalue.
        largest: an estimate of the largest eigenvalue, > 0.
        min_relative_eigenvalue: in ``(0, 1)``.

    Returns:
        The damping, >= 0.

    Raises:
        ValueError: if the estimates are not finite or ``largest <= 0``.
    """
    if not (math.isfinite(smallest) and math.isfinite(largest) and largest > 0):
        raise ValueError(
            f"invalid eigenvalue estimates ({smallest}, {largest}): expected finite values with largest > 0; "
            "check the Hessian-vector product for NaN, or configure the damping"
        )
    if not 0 < min_relative_eigenvalue < 1:
        raise ValueError(f"invalid min_relative_eigenvalue={min_relative_eigenvalue!r}: expected a number in (0, 1)")
    floor = min_relative_eigenvalue * largest
    shifted = 2.0 * smallest if smallest < 0 else smallest
    return float(max(0.0, floor - shifted))


# LiSSA.


@jax.jit
def _lissa_step(x: Params, Ax: Params, b: Params, scale: float, damping: float):
    """Return ``x + r`` and ``||r||`` where ``r = b - (A + damping·I) x / scale``."""
    r = jax.tree.map(lambda bi, axi, xi: bi - (axi + damping * xi) / scale, b, Ax, x)
    return jax.tree.map(jnp.add, x, r), jnp.sqrt(tree_vdot(r, r))


def lissa(
    A: Operator,
    b: Params,
    *,
    damping: float = 0.0,
    scale: float = 1.0,
    depth: int = 1000,
    tol: float = 1e-3,
    auto_scale: bool = True,
    scale_growth: float = 4.0,
    max_attempts: int = 8,
) -> LissaResult:
    """Solve ``(A + damping·I) x = b`` by the LiSSA recursion, detecting divergence.

    The recursion is ``y_0 = b``, ``y_{j+1} = b + (I - (A + damping·I)/scale) y_j``
    and the estimate is ``x = y / scale``. It converges when every eigenvalue
    of ``(A + damping·I)/scale`` lies in ``(0, 2)``. Its step ``y_{j+1} - y_j``
    equals the scaled residual, so the residual is known at every step
    without extra work, and the run stops once it is below ``tol``.

    Divergence test: if the eigenvalues lie in ``[0, 2]``, then
    ``||I - (A + damping·I)/scale|| <= 1`` and ``||y_j|| <= (j + 1)·||b||``. An
    iterate above that bound (or not finite) proves that the scale is too small
    or the operator is indefinite. With ``auto_scale`` the run then restarts
    with ``scale × scale_growth``, up to ``max_attempts`` scales in all. When
    every scale diverges the result has ``diverged=True``, zeros for ``x`` and
    an infinite residual, so no NaN reaches the scores.

    This is the deterministic form: ``A`` is applied exactly. Passing a
    mini-batch Hessian operator gives the stochastic LiSSA, whose residual is
    then only an estimate.

    Args:
        A: a symmetric pytree operator.
        b: the right-hand side.
        damping: added to every eigenvalue of ``A``, >= 0.
        scale: the first scale to try, > 0; it should exceed half the largest eigenvalue.
        depth: maximum recursion steps per attempt, >= 1.
        tol: relative residual tolerance, > 0.
        auto_scale: retry larger scales after a divergence.
        scale_growth: factor between successive scales, > 1.
        max_attempts: scales to try in all, >= 1.

    Returns:
        A :class:`LissaResult`.

    Raises:
        ValueError: if an argument is out of range.
    """
    check_nonnegative("damping", damping)
    check_tol(tol)
    check_positive_int("depth", depth)
    check_positive_int("max_attempts", max_attempts)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"invalid scale={scale!r}: expected a finite number > 0")
    if not (math.isfinite(scale_growth) and scale_growth > 1):
        raise ValueError(f"invalid scale_growth={scale_growth!r}: expected a finite number > 1")

    b_norm = _tree_norm(b)
    if b_norm == 0.0:
        zeros = jax.tree.map(jnp.zeros_like, b)
        return LissaResult(zeros, 0, 0.0, True, False, float(scale), 1, float(damping))

    attempts = 0
    while True:
        attempts += 1
        y, iterations, residual, diverged = _lissa_attempt(A, b, b_norm, damping, scale, depth, tol)
        if not diverged or not auto_scale or attempts >= max_attempts:
            break
        scale *= scale_growth

    if diverged:
        zeros = jax.tree.map(jnp.zeros_like, b)
        return LissaResult(zeros, iterations, math.inf, False, True, float(scale), attempts, float(damping))
    x = jax.tree.map(lambda leaf: leaf / scale, y)
    return LissaResult(x, iterations, residual, residual <= tol, False, float(scale), attempts, float(damping))


def _lissa_attempt(A, b, b_norm, damping, scale, depth, tol):
    """Run one LiSSA recursion and return ``(y, steps, relative residual, diverged)``."""
    y = b
    steps = 0
    while steps < depth:
        y, r_norm = _lissa_step(y, A(y), b, scale, damping)
        steps += 1
        y_norm = _tree_norm(y)
        if not (math.isfinite(y_norm) and y_norm <= 1.01 * (steps + 1) * b_norm):
            return y, steps, math.inf, True
        # r_norm is the residual of the previous iterate, so the new one is at least as good.
        if float(r_norm) <= tol * b_norm:
            break
    residual = relative_residual(_damped(A, damping), b, jax.tree.map(lambda leaf: leaf / scale, y), b_norm)
    return y, steps, residual, False
