"""Tests for detectors.solvers and detectors.factors: the C06 and C08 cases, Lanczos and stored factors."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from detectors.factors import (
    FORMAT_VERSION,
    ResidualTreatment,
    apply_inverse,
    compute_factors,
    factors_from_bytes,
    factors_to_bytes,
)
from detectors.solvers import cg, choose_damping, estimate_extreme_eigenvalues, lissa

LISSA_HESSIAN = jnp.diag(jnp.array([10.0, 1.0, 0.1]))
INDEFINITE = jnp.diag(jnp.array([2.0, -0.5]))


def spd_matrix(size: int, seed: int) -> jnp.ndarray:
    rng = np.random.default_rng(seed)
    factor = rng.normal(size=(size, size))
    return jnp.asarray(factor @ factor.T / size + 0.1 * np.eye(size), jnp.float32)


def test_cg_unconverged_reports_residual():
    result = cg(lambda v: jnp.diag(jnp.array([1.0, 1e-6])) @ v, jnp.ones(2), maxiter=1)

    np.testing.assert_allclose(result.x, [2.0, 2.0], rtol=1e-5)
    np.testing.assert_allclose(float(result.residual), 1.0, rtol=1e-5)
    assert not bool(result.converged)
    assert int(result.iterations) == 1
    assert result.damping == 0.0


def test_cg_undamped_indefinite_flagged():
    result = cg(lambda v: INDEFINITE @ v, jnp.ones(2), maxiter=10)

    assert bool(result.negative_curvature)
    assert int(result.iterations) == 1
    assert not bool(result.converged)


def test_cg_damping_solves_indefinite():
    result = cg(lambda v: INDEFINITE @ v, jnp.ones(2), maxiter=10, damping=0.6)

    np.testing.assert_allclose(result.x, [0.3846, 10.0], rtol=1e-3)
    assert bool(result.converged)
    assert result.damping == 0.6


def test_cg_auto_damping_makes_indefinite_solvable():
    result = cg(lambda v: INDEFINITE @ v, jnp.ones(2), maxiter=10, damping=None)

    assert result.damping > 0.5
    assert bool(result.converged)
    assert not bool(result.negative_curvature)


def test_cg_auto_damping_zero_when_well_conditioned():
    matrix = spd_matrix(6, 0)
    result = cg(lambda v: matrix @ v, jnp.ones(6), tol=1e-6, maxiter=50, damping=None)

    assert result.damping == 0.0
    np.testing.assert_allclose(result.x, np.linalg.solve(matrix, np.ones(6)), rtol=1e-3)


def test_lissa_small_scale_diverges_without_nan():
    result = lissa(lambda v: LISSA_HESSIAN @ v, jnp.ones(3), scale=1.0, depth=50, auto_scale=False)

    assert result.diverged
    assert not result.converged
    assert result.iterations <= 12
    assert np.all(np.isfinite(np.asarray(result.x)))
    assert result.residual == float("inf")


def test_lissa_scale_twenty_matches_inverse():
    result = lissa(lambda v: LISSA_HESSIAN @ v, jnp.ones(3), scale=20.0, depth=5000, auto_scale=False, tol=1e-5)

    np.testing.assert_allclose(result.x, [0.1, 1.0, 10.0], rtol=0.01)
    assert not result.diverged
    assert result.scale == 20.0


def test_lissa_auto_scale_recovers():
    result = lissa(lambda v: LISSA_HESSIAN @ v, jnp.ones(3), scale=1.0, depth=5000, tol=1e-4)

    np.testing.assert_allclose(result.x, [0.1, 1.0, 10.0], rtol=0.01)
    assert result.converged
    assert result.attempts == 3
    assert result.scale == 16.0


def test_lissa_rejects_invalid_scale():
    with pytest.raises(ValueError, match=r"scale=0\.0.*> 0"):
        lissa(lambda v: v, jnp.ones(2), scale=0.0)


def test_extreme_eigenvalues_estimate():
    lowest, highest = estimate_extreme_eigenvalues(lambda v: LISSA_HESSIAN @ v, jnp.ones(3))

    np.testing.assert_allclose([lowest, highest], [0.1, 10.0], rtol=1e-3)


@pytest.mark.parametrize(
    ("smallest", "largest", "expected"),
    [
        pytest.param(1.0, 10.0, 0.0, id="well-conditioned"),
        pytest.param(-0.5, 2.0, 1.0002, id="negative"),
        pytest.param(1e-6, 100.0, 0.01 - 1e-6, id="ill-conditioned"),
    ],
)
def test_choose_damping_rule(smallest, largest, expected):
    assert choose_damping(smallest, largest) == pytest.approx(expected, rel=1e-6)


def test_factors_full_rank_exact():
    matrix = spd_matrix(12, 1)
    b = {"a": jnp.arange(7.0), "b": jnp.ones(5)}
    flat_b = np.concatenate([np.arange(7.0), np.ones(5)])

    def hvp(v):
        flat = jnp.concatenate([v["a"], v["b"]])
        out = matrix @ flat
        return {"a": out[:7], "b": out[7:]}

    factors = compute_factors(hvp, b, 12, damping=0.0)
    solve = apply_inverse(factors, b)

    assert factors.rank == 12
    assert solve.captured == pytest.approx(1.0, abs=1e-4)
    expected = np.linalg.solve(np.asarray(matrix, np.float64), flat_b)
    np.testing.assert_allclose(np.concatenate([solve.x["a"], solve.x["b"]]), expected, rtol=2e-3, atol=1e-3)


def test_factors_truncated_residual_treatments():
    values = jnp.array([8.0, 4.0, 1.0, 0.5])
    b = jnp.ones(4)
    factors = compute_factors(lambda v: values * v, b, 2, damping=0.0, oversampling=2)

    smallest = apply_inverse(factors, b, residual=ResidualTreatment.SMALLEST)
    dropped = apply_inverse(factors, b, residual=ResidualTreatment.DROP)

    np.testing.assert_allclose(factors.eigenvalues, [8.0, 4.0], rtol=1e-4)
    np.testing.assert_allclose(np.abs(smallest.x), [0.125, 0.25, 0.25, 0.25], rtol=1e-4)
    np.testing.assert_allclose(np.abs(dropped.x), [0.125, 0.25, 0.0, 0.0], atol=1e-5)
    assert smallest.captured == pytest.approx(np.sqrt(0.5), rel=1e-4)


def test_factors_round_trip_bytes():
    factors = compute_factors(lambda v: {"w": 2.0 * v["w"]}, {"w": jnp.ones((2, 2))}, 3, damping=0.1, l2=0.01)

    restored = factors_from_bytes(factors_to_bytes(factors))

    np.testing.assert_array_equal(restored.eigenvalues, factors.eigenvalues)
    np.testing.assert_array_equal(restored.eigenvectors, factors.eigenvectors)
    assert restored.leaf_shapes == ((2, 2),)
    assert restored.damping == 0.1
    assert restored.l2 == 0.01


def test_factors_reject_other_format_version():
    import io
    import json

    data = factors_to_bytes(compute_factors(lambda v: 2.0 * v, jnp.ones(3), 2, damping=0.0))
    with np.load(io.BytesIO(data)) as archive:
        arrays = {key: archive[key] for key in archive.files}
    metadata = json.loads(str(arrays["metadata"]))
    metadata["format_version"] = FORMAT_VERSION + 1
    arrays["metadata"] = np.array(json.dumps(metadata))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)

    with pytest.raises(ValueError, match=rf"format version {FORMAT_VERSION + 1}, expected {FORMAT_VERSION}"):
        factors_from_bytes(buffer.getvalue())


def test_factors_reject_other_layout():
    factors = compute_factors(lambda v: 2.0 * v, jnp.ones(3), 2, damping=0.0)

    with pytest.raises(ValueError, match=r"leaf shapes \(\(4,\),\)"):
        apply_inverse(factors, jnp.ones(4))
