"""A low-rank factorisation of the damped Hessian, computed once per model version.

Lanczos on ``A = H + damping·I`` (the Hessian of the training objective plus
damping) yields its top-r eigenpairs ``A ≈ U diag(μ) Uᵀ``. Every incident of
that model version then solves its inverse-HVP without touching the training
set:

    A⁻¹ b ≈ U diag(1/μ) Uᵀ b + c · (b - U Uᵀ b),

where the second term is the *residual subspace*, the part of ``b`` outside
the top-r eigenvectors. Its coefficient ``c`` is set by
:class:`ResidualTreatment`: ``SMALLEST`` takes ``c = 1/μ_r`` (the smallest
retained eigenvalue, so the residual is treated as if it had that curvature,
the value a deflation preconditioner uses), ``DROP`` takes ``c = 0`` (the
residual is projected out, as in Arnoldi influence). With ``r = P`` the
residual is empty and the solve is exact up to rounding. With ``r < P``,
``captured`` in :class:`FactorSolve` reports how much of ``b`` lay in the span,
and an explicit residual (one HVP pass) measures how accurate the solve was.

The factors serialise with :func:`factors_to_bytes` to an ``.npz`` archive
(never pickle) that carries :data:`FORMAT_VERSION`, checked by
:func:`factors_from_bytes`.
"""

from __future__ import annotations

import enum
import io
import json
import zipfile
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from detectors.solvers import Operator, check_nonnegative, check_positive_int, flat_operator, lanczos, ritz_pairs

Params = Any

# Version of the archive written by factors_to_bytes. Bump it when a field
# changes meaning. factors_from_bytes rejects other versions.
FORMAT_VERSION = 1

# Lanczos steps beyond the rank, so that the kept Ritz pairs have converged.
DEFAULT_OVERSAMPLING = 16


class ResidualTreatment(str, enum.Enum):
    """Treatment by :func:`apply_inverse` of the part of ``b`` outside the kept eigenvectors."""

    SMALLEST = "smallest"
    DROP = "drop"


class HessianFactors(NamedTuple):
    """The top eigenpairs of ``H + damping·I`` at one model version's parameters.

    Attributes:
        eigenvalues: float64 ``(r,)``, descending.
        eigenvectors: float32 ``(r, P)``, orthonormal rows over the flattened parameters.
        ritz_residuals: float64 ``(r,)``, ``||A u_i - μ_i u_i||`` bounds from Lanczos.
        damping: the damping included in ``eigenvalues``.
        l2: the L2 coefficient of the objective included in ``eigenvalues``.
        lanczos_steps: how many Lanczos steps produced the factors.
        leaf_shapes: the shapes of the parameter leaves, in ``ravel_pytree`` order,
            to check that an incident uses the same parameter layout.
    """

    eigenvalues: np.ndarray
    eigenvectors: jax.Array
    ritz_residuals: np.ndarray
    damping: float
    l2: float
    lanczos_steps: int
    leaf_shapes: tuple[tuple[int, ...], ...]

    @property
    def rank(self) -> int:
        """The number of kept eigenpairs ``r``."""
        return int(self.eigenvalues.shape[0])


class FactorSolve(NamedTuple):
    """An inverse-HVP from :func:`apply_inverse`.

    Attributes:
        x: the solution, shaped like ``b``.
        captured: ``||U Uᵀ b|| / ||b||``, in [0, 1]; 1 means ``b`` lies in the
            span of the factors and only the Ritz residuals limit accuracy.
    """

    x: Params
    captured: float


def compute_factors(
    hvp: Operator,
    params: Params,
    rank: int,
    *,
    damping: float,
    l2: float = 0.0,
    oversampling: int = DEFAULT_OVERSAMPLING,
    seed: int = 0,
) -> HessianFactors:
    """Compute the top-``rank`` eigenpairs of the damped Hessian by Lanczos.

    Costs ``rank + oversampling`` applications of ``hvp`` (each a pass over the
    training set) and ``(rank + oversampling) × P`` floats of memory for the
    basis. Meant as a release check, once per model version.

    Args:
        hvp: ``v -> (H + damping·I) v``, e.g. from
            :func:`detectors.influence.make_objective_hvp` with the same ``damping``.
        params: the parameters ``hvp`` expands around, a pytree with P values.
        rank: eigenpairs to keep, ``1 <= rank``; capped at P.
        damping: the damping already inside ``hvp``, recorded in the factors.
        l2: the objective's L2 coefficient, recorded in the factors.
        oversampling: extra Lanczos steps, >= 0.
        seed: seed of the Gaussian start vector.

    Returns:
        :class:`HessianFactors`. Eigenvalues at or below zero (an indefinite
        Hessian with too little damping) are dropped, so ``rank`` can be smaller
        than requested. Check ``eigenvalues.size``.
    """
    check_positive_int("rank", rank)
    check_nonnegative("damping", damping)
    check_nonnegative("l2", l2)
    if isinstance(oversampling, bool) or not isinstance(oversampling, int) or oversampling < 0:
        raise ValueError(f"invalid oversampling={oversampling!r}: expected an integer >= 0")

    A_flat, flat_params, _ = flat_operator(hvp, params)
    size = flat_params.shape[0]
    steps = min(rank + oversampling, size)
    start = jax.random.normal(jax.random.key(seed), (size,), jnp.float32)
    values, vectors, residuals = ritz_pairs(lanczos(A_flat, start, steps))

    order = np.argsort(values)[::-1][: min(rank, size)]
    order = order[values[order] > 0]
    return HessianFactors(
        eigenvalues=values[order].astype(np.float64),
        eigenvectors=vectors[jnp.asarray(order)],
        ritz_residuals=residuals[order].astype(np.float64),
        damping=float(damping),
        l2=float(l2),
        lanczos_steps=int(len(values)),
        leaf_shapes=_leaf_shapes(params),
    )


def _leaf_shapes(params: Params) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(d) for d in np.shape(leaf)) for leaf in jax.tree.leaves(params))


@jax.jit
def _apply_factors(eigenvectors: jax.Array, inverse_values: jax.Array, residual_coefficient, b: jax.Array):
    coefficients = eigenvectors @ b
    in_span = eigenvectors.T @ coefficients
    x = eigenvectors.T @ (coefficients * inverse_values) + residual_coefficient * (b - in_span)
    return x, jnp.linalg.norm(in_span)


def apply_inverse(
    factors: HessianFactors, b: Params, *, residual: ResidualTreatment = ResidualTreatment.SMALLEST
) -> FactorSolve:
    """Apply the factorised inverse of ``H + damping·I`` to ``b``.

    Costs two ``(r, P)`` matrix-vector products, no pass over the training set.

    Args:
        factors: from :func:`compute_factors` or :func:`factors_from_bytes`.
        b: a pytree with the parameter layout the factors were computed for.
        residual: the treatment of the residual subspace, see the module docstring.

    Returns:
        A :class:`FactorSolve`.

    Raises:
        ValueError: if ``b``'s layout differs from the factors' or the factors are empty.
    """
    shapes = _leaf_shapes(b)
    if shapes != factors.leaf_shapes:
        raise ValueError(
            f"invalid right-hand side with leaf shapes {shapes}: the factors were computed for {factors.leaf_shapes}"
        )
    if factors.rank == 0:
        raise ValueError("the factors hold no positive eigenvalues; recompute them with more damping")
    residual = ResidualTreatment(residual)
    flat_b, unravel = ravel_pytree(b)
    coefficient = 0.0 if residual is ResidualTreatment.DROP else 1.0 / float(factors.eigenvalues[-1])
    inverse_values = jnp.asarray(1.0 / factors.eigenvalues, jnp.float32)
    x, in_span_norm = _apply_factors(
        factors.eigenvectors, inverse_values, jnp.float32(coefficient), flat_b.astype(jnp.float32)
    )
    b_norm = float(jnp.linalg.norm(flat_b))
    captured = float(in_span_norm) / b_norm if b_norm > 0 else 1.0
    return FactorSolve(x=unravel(x.astype(flat_b.dtype)), captured=min(captured, 1.0))


def factors_to_bytes(factors: HessianFactors) -> bytes:
    """Serialise factors to an uncompressed ``.npz`` archive with :data:`FORMAT_VERSION`."""
    metadata = {
        "format_version": FORMAT_VERSION,
        "damping": factors.damping,
        "l2": factors.l2,
        "lanczos_steps": factors.lanczos_steps,
        "leaf_shapes": [list(shape) for shape in factors.leaf_shapes],
    }
    buffer = io.BytesIO()
    np.savez(
        buffer,
        metadata=np.array(json.dumps(metadata)),
        eigenvalues=np.asarray(factors.eigenvalues, np.float64),
        eigenvectors=np.asarray(factors.eigenvectors, np.float32),
        ritz_residuals=np.asarray(factors.ritz_residuals, np.float64),
    )
    return buffer.getvalue()


def factors_from_bytes(data: bytes) -> HessianFactors:
    """Read factors written by :func:`factors_to_bytes`, checking the format version.

    Raises:
        ValueError: if ``data`` is not such an archive, or its format version
            differs from :data:`FORMAT_VERSION` (recompute the factors then).
    """
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            metadata = json.loads(str(archive["metadata"]))
            arrays = {key: archive[key] for key in ("eigenvalues", "eigenvectors", "ritz_residuals")}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"invalid Hessian factors archive: {error}") from error
    found = metadata.get("format_version")
    if found != FORMAT_VERSION:
        raise ValueError(
            f"Hessian factors have format version {found!r}, expected {FORMAT_VERSION}; recompute them for this model version"
        )
    return HessianFactors(
        eigenvalues=arrays["eigenvalues"],
        eigenvectors=jnp.asarray(arrays["eigenvectors"]),
        ritz_residuals=arrays["ritz_residuals"],
        damping=float(metadata["damping"]),
        l2=float(metadata["l2"]),
        lanczos_steps=int(metadata["lanczos_steps"]),
        leaf_shapes=tuple(tuple(shape) for shape in metadata["leaf_shapes"]),
    )
