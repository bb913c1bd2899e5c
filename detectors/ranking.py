"""Turning influence scores into a ranking of suspected poisons.

Raw influence ``(1/N)·∇loss_testᵀ H⁻¹ ∇loss(z)`` grows with the norm of z's
own gradient, so high-loss training examples (mislabelled or just hard ones)
dominate it whatever their relation to the incident. Two normalised scores
correct for that:

- ``GRADIENT_NORM``: the raw score divided by ``||∇loss(z)||``. It only needs
  per-example gradient norms.
- ``RELATIVE``: θ-relative influence (Barshan et al., "RelatIF", AISTATS
  2020), the raw score divided by
  ``sqrt(∇loss(z)ᵀ (H + λI)⁻¹ ∇loss(z))``, z's self-influence. It needs the
  per-version factors, because one solve per training example is too dear.

Both normalisers depend on the model version only, not on the incident, so
they are computed once per version (:func:`example_gradient_norms`,
:func:`example_self_influence`) and stored with it. :func:`aggregate_by_source`
sums scores by data source: the total of a source is the first-order
predicted effect of removing that whole source.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding

from detectors.batching import fit_batch_size, padded_batches
from detectors.factors import HessianFactors, ResidualTreatment
from detectors.solvers import check_positive_int

Params = Any
LossFn = Callable[[Params, Any, Any], jax.Array]

# Normalisers below this are treated as this, so a training example with a
# vanishing gradient gets a score of about 0 rather than inf or NaN.
NORMALIZER_FLOOR = 1e-12


class ScoreKind(str, enum.Enum):
    """Score that ranks suspects, as the module docstring defines each."""

    RAW = "raw"
    GRADIENT_NORM = "gradient-norm"
    RELATIVE = "relative"


class SourceInfluence(NamedTuple):
    """The influence of one data source on an incident.

    Attributes:
        source: the source name.
        total: the sum of the source's scores, the predicted change of the
            incident's loss if the whole source were removed (first order).
        count: how many training examples the source has.
        most_negative: the source's lowest single score.
    """

    source: str
    total: float
    count: int
    most_negative: float


@functools.partial(jax.jit, static_argnums=0)
def _batch_flat_gradients(loss: LossFn, params: Params, x, y) -> jax.Array:
    def example_gradient(xi, yi):
        gradient = jax.grad(lambda theta: loss(theta, xi[None], yi[None])[0])(params)
        return ravel_pytree(gradient)[0]

    return jax.vmap(example_gradient)(x, y)


@functools.partial(jax.jit, static_argnums=0)
def _batch_gradient_norms(loss: LossFn, params: Params, x, y) -> jax.Array:
    return jnp.linalg.norm(_batch_flat_gradients(loss, params, x, y), axis=1)


@functools.partial(jax.jit, static_argnums=0)
def _batch_self_influence(loss: LossFn, params: Params, x, y, eigenvectors, inverse_values, residual_coefficient):
    gradients = _batch_flat_gradients(loss, params, x, y)
    coefficients = gradients @ eigenvectors.T
    in_span = jnp.sum(coefficients**2, axis=1)
    outside = jnp.maximum(jnp.sum(gradients**2, axis=1) - in_span, 0.0)
    return jnp.sum(coefficients**2 * inverse_values, axis=1) + residual_coefficient * outside


def _map_batches(function, x, y, batch_size: int, sharding: NamedSharding | None) -> np.ndarray:
    check_positive_int("batch_size", batch_size)
    batch_size = fit_batch_size(batch_size, len(x), sharding)
    pieces = []
    for x_batch, y_batch, mask in padded_batches(x, y, batch_size, sharding):
        pieces.append((function(x_batch, y_batch), int(np.sum(mask))))
    return np.concatenate([np.asarray(values)[:rows] for values, rows in pieces])


def example_gradient_norms(
    loss: LossFn, params: Params, x, y, *, batch_size: int = 128, sharding: NamedSharding | None = None
) -> np.ndarray:
    """Compute ``||∇_θ loss(θ, x_i, y_i)||`` for every training example.

    Forms per-example gradients one batch at a time, ``batch_size × P`` floats,
    so lower ``batch_size`` for large parameter subsets.

    Returns:
        float32 ``(N,)``.
    """
    return _map_batches(
        lambda xb, yb: _batch_gradient_norms(loss, params, xb, yb), x, y, batch_size, sharding
    ).astype(np.float32)


def example_self_influence(
    loss: LossFn,
    params: Params,
    x,
    y,
    factors: HessianFactors,
    *,
    residual: ResidualTreatment = ResidualTreatment.SMALLEST,
    batch_size: int = 128,
    sharding: NamedSharding | None = None,
) -> np.ndarray:
    """Compute ``∇loss(z)ᵀ (H + λI)⁻¹ ∇loss(z)`` for every training example from the factors.

    Uses the same factorised inverse as :func:`detectors.factors.apply_inverse`.

    Returns:
        float32 ``(N,)``, >= 0.
    """
    residual = ResidualTreatment(residual)
    coefficient = 0.0 if residual is ResidualTreatment.DROP else 1.0 / float(factors.eigenvalues[-1])
    inverse_values = jnp.asarray(1.0 / factors.eigenvalues, jnp.float32)

    def batch(xb, yb):
        return _batch_self_influence(
            loss, params, xb, yb, factors.eigenvectors, inverse_values, jnp.float32(coefficient)
        )

    return _map_batches(batch, x, y, batch_size, sharding).astype(np.float32)


def normalize_scores(
    scores: np.ndarray,
    kind: ScoreKind | str,
    *,
    gradient_norms: np.ndarray | None = None,
    self_influence: np.ndarray | None = None,
) -> np.ndarray:
    """Return the scores of ``kind``: raw, divided by gradient norms, or divided by sqrt(self-influence).

    The sign convention of the raw scores is kept: most negative ranks first.

    Raises:
        ValueError: if the normaliser that ``kind`` needs is missing or has the wrong shape.
    """
    kind = ScoreKind(kind)
    scores = np.asarray(scores, np.float64)
    if kind is ScoreKind.RAW:
        return scores
    if kind is ScoreKind.GRADIENT_NORM:
        normalizer, name = gradient_norms, "gradient_norms"
    else:
        normalizer, name = None if self_influence is None else np.sqrt(np.maximum(self_influence, 0.0)), "self_influence"
    if normalizer is None:
        raise ValueError(f"score kind {kind.value!r} needs {name}; compute it once per model version")
    normalizer = np.asarray(normalizer, np.float64)
    if normalizer.shape != scores.shape:
        raise ValueError(f"invalid {name} of shape {normalizer.shape}: expected {scores.shape} like the scores")
    return scores / np.maximum(normalizer, NORMALIZER_FLOOR)


def aggregate_by_source(scores: np.ndarray, sources: np.ndarray) -> list[SourceInfluence]:
    """Sum the scores by data source, most negative total first.

    Args:
        scores: ``(N,)`` raw influence scores.
        sources: ``(N,)`` source names.

    Returns:
        One :class:`SourceInfluence` per distinct source.
    """
    scores = np.asarray(scores, np.float64)
    sources = np.asarray(sources)
    if sources.shape != scores.shape:
        raise ValueError(f"invalid sources of shape {sources.shape}: expected {scores.shape} like the scores")
    names, inverse = np.unique(sources, return_inverse=True)
    totals = np.bincount(inverse, weights=scores, minlength=len(names))
    counts = np.bincount(inverse, minlength=len(names))
    lowest = np.full(len(names), np.inf)
    np.minimum.at(lowest, inverse, scores)
    result = [
        SourceInfluence(str(name), float(total), int(count), float(low))
        for name, total, count, low in zip(names, totals, counts, lowest, strict=True)
    ]
    return sorted(result, key=lambda item: item.total)
