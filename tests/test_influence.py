"""Tests for detectors.influence against dense-Hessian and leave-one-out references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from detectors.influence import (
    cg,
    compute_influence,
    incident_gradient,
    make_objective_hvp,
    score_training_examples,
    top_k,
)

# 37 rows in batches of 16 leave a last batch of 5 real rows and 11 padding rows.
N_TRAIN = 37
BATCH_SIZE = 16


def mlp_loss(params, x, y):
    """Softmax cross-entropy of a 3-6-3 tanh MLP (45 parameters)."""
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    logits = hidden @ params["w2"] + params["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def linear_loss(params, x, y):
    """Softmax cross-entropy of a linear classifier."""
    return optax.softmax_cross_entropy_with_integer_labels(x @ params["w"] + params["b"], y)


def quadratic_loss(hessian):
    """Build a loss equal to ``θᵀ H θ / 2`` for every example, whatever the input."""

    def loss(params, x, y):
        return jnp.broadcast_to(0.5 * params @ hessian @ params, y.shape)

    return loss


@pytest.fixture(scope="module")
def mlp_problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N_TRAIN, 3)).astype(np.float32)
    y = rng.integers(0, 3, size=N_TRAIN).astype(np.int32)
    keys = jax.random.split(jax.random.key(0), 2)
    params = {
        "w1": jax.random.normal(keys[0], (3, 6)) * 0.8,
        "b1": jnp.full((6,), 0.1),
        "w2": jax.random.normal(keys[1], (6, 3)) * 0.8,
        "b2": jnp.array([0.2, -0.1, 0.0]),
    }
    return params, x, y


def dense_hessian(loss, params, x, y, l2):
    """Return the Hessian of mean loss + (l2/2)·||θ||² over the flattened parameters."""
    flat, unravel = ravel_pytree(params)

    def objective(theta):
        return jnp.mean(loss(unravel(theta), x, y)) + 0.5 * l2 * jnp.sum(theta**2)

    return np.asarray(jax.hessian(objective)(flat), dtype=np.float64)


def flatten(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0], dtype=np.float64)


def test_hvp_matches_dense_hessian(mlp_problem):
    params, x, y = mlp_problem
    l2, damping = 0.03, 0.2
    v = jax.tree.map(lambda leaf: jnp.linspace(-1.0, 1.0, leaf.size).reshape(leaf.shape), params)

    hvp = make_objective_hvp(mlp_loss, params, x, y, l2=l2, damping=damping, batch_size=BATCH_SIZE)
    expected = (dense_hessian(mlp_loss, params, x, y, l2) + damping * np.eye(45)) @ flatten(v)

    np.testing.assert_allclose(flatten(hvp(v)), expected, rtol=1e-4, atol=1e-5)


def test_scores_match_dense_reference(mlp_problem):
    params, x, y = mlp_problem
    l2, damping = 0.03, 1.0
    test_x, test_y = np.array([0.5, -1.0, 0.3], np.float32), 2
    hessian = dense_hessian(mlp_loss, params, x, y, l2) + damping * np.eye(45)
    assert np.linalg.eigvalsh(hessian).min() > 0.1, "the reference needs a positive definite damped Hessian"

    report = compute_influence(
        mlp_loss, params, x, y, test_x, test_y, l2=l2, damping=damping, tol=1e-6, batch_size=BATCH_SIZE
    )
    solution = np.linalg.solve(hessian, flatten(incident_gradient(mlp_loss, params, test_x, test_y)))
    expected = [flatten(incident_gradient(mlp_loss, params, x[i], y[i])) @ solution / N_TRAIN for i in range(N_TRAIN)]

    assert report.converged
    assert not report.negative_curvature
    assert report.scores.dtype == np.float32
    assert report.scores.shape == (N_TRAIN,)
    np.testing.assert_allclose(report.scores, expected, rtol=1e-3, atol=1e-6)


def test_scores_accept_memmap(mlp_problem, tmp_path):
    params, x, y = mlp_problem
    direction = jax.tree.map(jnp.ones_like, params)
    x_file = np.memmap(tmp_path / "x.f32", dtype=np.float32, mode="w+", shape=x.shape)
    x_file[:] = x
    x_file.flush()

    from_memmap = score_training_examples(mlp_loss, params, direction, x_file, y, batch_size=BATCH_SIZE)
    from_memory = score_training_examples(mlp_loss, params, direction, x, y, batch_size=BATCH_SIZE)

    np.testing.assert_allclose(from_memmap, from_memory, rtol=0, atol=0)


def test_scoring_compiles_once():
    traces = []

    def counting_loss(params, x, y):
        traces.append(x.shape)
        return linear_loss(params, x, y)

    rng = np.random.default_rng(1)
    x = rng.normal(size=(N_TRAIN, 2)).astype(np.float32)
    y = rng.integers(0, 2, size=N_TRAIN).astype(np.int32)
    params = {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}

    scores = score_training_examples(counting_loss, params, params, x, y, batch_size=BATCH_SIZE)
    score_training_examples(counting_loss, params, params, x, y, batch_size=BATCH_SIZE)

    assert traces == [(BATCH_SIZE, 2)]
    assert scores.shape == (N_TRAIN,)


def test_hvp_compiles_once(mlp_problem):
    params, x, y = mlp_problem
    traces = []

    def counting_loss(params, x, y):
        traces.append(x.shape)
        return mlp_loss(params, x, y)

    hvp = make_objective_hvp(counting_loss, params, x, y, l2=0.1, batch_size=BATCH_SIZE)
    hvp(params)
    hvp(params)

    assert traces == [(BATCH_SIZE, 3)]


def test_cg_solves_spd_system():
    rng = np.random.default_rng(2)
    factor = rng.normal(size=(8, 8))
    matrix = jnp.asarray(factor @ factor.T + 8 * np.eye(8), jnp.float32)
    b = {"a": jnp.asarray(rng.normal(size=5), jnp.float32), "b": jnp.asarray(rng.normal(size=3), jnp.float32)}
    flat_b, unravel = ravel_pytree(b)

    result = cg(lambda v: unravel(matrix @ ravel_pytree(v)[0]), b, tol=1e-6, maxiter=50)

    assert bool(result.converged)
    assert not bool(result.negative_curvature)
    assert float(result.residual) <= 1e-6
    assert result.iterations.dtype == jnp.int32
    assert 1 <= int(result.iterations) <= 50
    np.testing.assert_allclose(flatten(result.x), np.linalg.solve(matrix, flat_b), rtol=1e-4, atol=1e-5)


def test_cg_reports_unconverged_solve():
    # One CG step on diag(1, 1e-6) gives about (2, 2), far from the solution (1, 1e6).
    matrix = jnp.diag(jnp.array([1.0, 1e-6]))

    result = cg(lambda v: matrix @ v, jnp.ones(2), maxiter=1)

    np.testing.assert_allclose(result.x, [2.0, 2.0], rtol=1e-5)
    np.testing.assert_allclose(result.residual, 1.0, rtol=1e-5)
    assert not bool(result.converged)
    assert int(result.iterations) == 1
    assert not bool(result.negative_curvature)


def test_cg_flags_negative_curvature():
    # On diag(2, -0.5) the first direction has positive curvature, the second negative.
    hessian = jnp.diag(jnp.array([2.0, -0.5]))
    hvp = make_objective_hvp(quadratic_loss(hessian), jnp.zeros(2), np.zeros((3, 1)), np.zeros(3))

    result = cg(hvp, jnp.ones(2), tol=1e-6, maxiter=10)

    assert bool(result.negative_curvature)
    assert not bool(result.converged)
    assert int(result.iterations) == 1
    np.testing.assert_allclose(result.x, [4 / 3, 4 / 3], rtol=1e-5)


def test_cg_solves_damped_indefinite_system():
    hessian = jnp.diag(jnp.array([2.0, -0.5]))
    hvp = make_objective_hvp(quadratic_loss(hessian), jnp.zeros(2), np.zeros((3, 1)), np.zeros(3), damping=0.6)

    result = cg(hvp, jnp.ones(2), tol=1e-6, maxiter=10)

    assert not bool(result.negative_curvature)
    assert bool(result.converged)
    np.testing.assert_allclose(result.x, [1 / 2.6, 10.0], rtol=1e-4)


def test_cg_zero_rhs_returns_zero():
    result = cg(lambda v: 2.0 * v, jnp.zeros(3), x0=jnp.ones(3))

    np.testing.assert_array_equal(result.x, np.zeros(3))
    assert int(result.iterations) == 0
    assert bool(result.converged)


def test_cg_exact_initial_guess_takes_no_steps():
    matrix = jnp.diag(jnp.array([1.0, 2.0, 4.0]))
    b = jnp.array([1.0, 2.0, 4.0])

    result = cg(lambda v: matrix @ v, b, x0=jnp.ones(3))

    assert int(result.iterations) == 0
    assert bool(result.converged)
    np.testing.assert_allclose(result.x, np.ones(3), rtol=0, atol=0)


def test_compute_influence_rejects_nan_parameters(mlp_problem):
    params, x, y = mlp_problem
    broken = dict(params, b2=jnp.array([jnp.nan, 0.0, 0.0]))

    with pytest.raises(FloatingPointError, match="gradient"):
        compute_influence(mlp_loss, broken, x, y, x[0], y[0], batch_size=BATCH_SIZE)


def test_top_k_orders_most_negative_first():
    scores = np.array([0.5, -2.0, -1.0, -2.0, 3.0, -1.0], np.float32)

    np.testing.assert_array_equal(top_k(scores, 4), [1, 3, 2, 5])
    np.testing.assert_array_equal(top_k(scores, 6), [1, 3, 2, 5, 0, 4])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(
            lambda p, x, y: score_training_examples(mlp_loss, p, p, x, y, batch_size=0),
            r"batch_size=0",
            id="batch_size-zero",
        ),
        pytest.param(
            lambda p, x, y: make_objective_hvp(mlp_loss, p, x, y, batch_size=-4),
            r"batch_size=-4",
            id="hvp-batch_size-negative",
        ),
        pytest.param(
            lambda p, x, y: make_objective_hvp(mlp_loss, p, x, y, damping=-0.1),
            r"damping=-0\.1.*>= 0",
            id="damping-negative",
        ),
        pytest.param(
            lambda p, x, y: make_objective_hvp(mlp_loss, p, x, y, l2=float("nan")),
            r"l2=nan",
            id="l2-nan",
        ),
        pytest.param(lambda p, x, y: cg(lambda v: v, jnp.ones(2), tol=0.0), r"tol=0\.0.*> 0", id="tol-zero"),
        pytest.param(lambda p, x, y: cg(lambda v: v, jnp.ones(2), maxiter=0), r"maxiter=0.*>= 1", id="maxiter-zero"),
        pytest.param(
            lambda p, x, y: compute_influence(mlp_loss, p, x, y, x[0], y[0], maxiter=0),
            r"maxiter=0",
            id="influence-maxiter-zero",
        ),
        pytest.param(
            lambda p, x, y: compute_influence(mlp_loss, p, x, y, x[:2], y[0]),
            r"test_x of shape \(2, 3\)",
            id="influence-test_x-batched",
        ),
        pytest.param(lambda p, x, y: top_k(np.zeros(3), 4), r"k=4.*N = 3", id="k-above-N"),
        pytest.param(lambda p, x, y: top_k(np.zeros(3), 0), r"k=0", id="k-zero"),
        pytest.param(lambda p, x, y: top_k(np.array([0.0, np.nan]), 1), r"NaN", id="scores-nan"),
        pytest.param(
            lambda p, x, y: score_training_examples(mlp_loss, p, p, x, y[:5]),
            r"labels of shape \(5,\)",
            id="labels-short",
        ),
    ],
)
def test_invalid_argument_raises(mlp_problem, call, message):
    params, x, y = mlp_problem

    with pytest.raises(ValueError, match=message):
        call(params, x, y)


def test_influence_matches_leave_one_out():
    """Compare scores with the change of the test loss after retraining without each example.

    The model is an L2-regularized linear softmax classifier trained to machine
    precision by Newton's method in float64. Retraining takes the mean over the
    N - 1 remaining examples, as a real retraining would.
    """
    n, l2 = 30, 0.05
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(n, 2))
        y = (x[:, 0] + 0.5 * x[:, 1] + 0.7 * rng.normal(size=n) > 0).astype(np.int32)
        flat_start, unravel = ravel_pytree({"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)})

        def objective(theta, weights):
            return jnp.sum(weights * linear_loss(unravel(theta), x, y)) / jnp.sum(weights) + 0.5 * l2 * theta @ theta

        @jax.jit
        def train(weights):
            def newton_step(theta, _):
                step = jnp.linalg.solve(jax.hessian(objective)(theta, weights), jax.grad(objective)(theta, weights))
                return theta - step, None

            return jax.lax.scan(newton_step, flat_start, length=30)[0]

        theta = train(jnp.ones(n))
        assert float(jnp.linalg.norm(jax.grad(objective)(theta, jnp.ones(n)))) < 1e-12

        params = unravel(theta)
        test_x, test_y = np.array([1.0, 0.5]), 0

        def incident_loss(p):
            return float(linear_loss(p, test_x[None], np.array([test_y]))[0])

        report = compute_influence(
            linear_loss, params, x, y, test_x, test_y, l2=l2, damping=0.0, tol=1e-10, maxiter=50, batch_size=8
        )
        retrained = [unravel(train(jnp.ones(n).at[i].set(0.0))) for i in range(n)]
        actual = np.array([incident_loss(p) - incident_loss(params) for p in retrained])

    predicted = report.scores.astype(np.float64)
    assert report.converged
    assert np.corrcoef(predicted, actual)[0, 1] > 0.9
    assert 0.5 < np.linalg.norm(predicted) / np.linalg.norm(actual) < 2.0
    assert top_k(predicted, 1)[0] == np.argmin(actual)
    large = np.abs(actual) > 0.2 * np.abs(actual).max()
    np.testing.assert_array_equal(np.sign(predicted[large]), np.sign(actual[large]))


def test_gauss_newton_hvp_matches_dense(mlp_problem):
    from detectors.influence import make_gauss_newton_hvp

    params, x, y = mlp_problem
    flat, unravel = ravel_pytree(params)

    def logits(theta, inputs):
        p = unravel(theta)
        return jnp.tanh(inputs @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    def apply(p, inputs):
        return jnp.tanh(inputs @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    jacobians = jax.vmap(lambda row: jax.jacobian(lambda t: logits(t, row[None])[0])(flat))(jnp.asarray(x))
    probabilities = jax.nn.softmax(apply(params, x))
    curvature = jax.vmap(lambda p: jnp.diag(p) - jnp.outer(p, p))(probabilities)
    dense = np.einsum("ncp,ncd,ndq->pq", jacobians, curvature, jacobians) / N_TRAIN + 0.05 * np.eye(45)
    v = jax.tree.map(lambda leaf: jnp.linspace(-1.0, 1.0, leaf.size).reshape(leaf.shape), params)

    product = make_gauss_newton_hvp(apply, params, x, y, l2=0.05, batch_size=BATCH_SIZE)(v)

    np.testing.assert_allclose(flatten(product), dense @ flatten(v), rtol=1e-4, atol=1e-5)
    assert np.linalg.eigvalsh(dense).min() > 0


def test_solvers_agree_on_scores(mlp_problem):
    from detectors.factors import compute_factors

    params, x, y = mlp_problem
    common = dict(l2=0.03, damping=1.0, tol=1e-5, batch_size=BATCH_SIZE)
    cg_report = compute_influence(mlp_loss, params, x, y, x[0], y[0], maxiter=200, **common)
    lissa_report = compute_influence(mlp_loss, params, x, y, x[0], y[0], maxiter=3000, solver="lissa", **common)
    hvp = make_objective_hvp(mlp_loss, params, x, y, l2=0.03, damping=1.0, batch_size=BATCH_SIZE)
    factors = compute_factors(hvp, params, 45, damping=1.0, l2=0.03)
    factor_report = compute_influence(mlp_loss, params, x, y, x[0], y[0], solver="factors", factors=factors,
                                      **dict(common, tol=1e-3))

    assert lissa_report.converged
    assert lissa_report.solver == "lissa"
    assert factor_report.converged
    assert factor_report.reliable
    np.testing.assert_allclose(lissa_report.scores, cg_report.scores, rtol=1e-2, atol=1e-5)
    np.testing.assert_allclose(factor_report.scores, cg_report.scores, rtol=1e-2, atol=1e-5)


def test_unconverged_report_is_unreliable(mlp_problem):
    params, x, y = mlp_problem
    report = compute_influence(mlp_loss, params, x, y, x[0], y[0], damping=0.0, maxiter=1, batch_size=BATCH_SIZE)

    assert not report.converged
    assert not report.reliable


def test_normalized_scores_divide_by_norms():
    from detectors.ranking import normalize_scores

    scores = np.array([-4.0, -1.0, 2.0])
    by_norm = normalize_scores(scores, "gradient-norm", gradient_norms=np.array([4.0, 0.5, 0.0]))
    relative = normalize_scores(scores, "relative", self_influence=np.array([16.0, 0.25, 1.0]))

    np.testing.assert_allclose(by_norm[:2], [-1.0, -2.0])
    assert by_norm[2] > 0
    np.testing.assert_allclose(relative, [-1.0, -2.0, 2.0])


def test_normalized_scores_need_normalizer():
    from detectors.ranking import normalize_scores

    with pytest.raises(ValueError, match="needs gradient_norms"):
        normalize_scores(np.zeros(3), "gradient-norm")


def test_aggregate_by_source_orders_totals():
    from detectors.ranking import aggregate_by_source

    totals = aggregate_by_source(np.array([-1.0, 0.5, -3.0, -0.6]), np.array(["a", "a", "b", "c"]))

    assert [item.source for item in totals] == ["b", "c", "a"]
    assert totals[2].total == pytest.approx(-0.5)
    assert totals[2].count == 2
    assert totals[2].most_negative == -1.0


def test_gradient_norms_match_dense(mlp_problem):
    from detectors.ranking import example_gradient_norms

    params, x, y = mlp_problem
    norms = example_gradient_norms(mlp_loss, params, x, y, batch_size=BATCH_SIZE)
    expected = [np.linalg.norm(flatten(incident_gradient(mlp_loss, params, x[i], y[i]))) for i in range(N_TRAIN)]

    np.testing.assert_allclose(norms, expected, rtol=1e-4)


def test_subset_loss_freezes_other_leaves(mlp_problem):
    from detectors.subset import restrict_to_subset

    params, x, y = mlp_problem
    subset = restrict_to_subset(mlp_loss, params, lambda path: "2" in path)

    assert sorted(subset.params) == ["['b2']", "['w2']"]
    np.testing.assert_allclose(subset.loss(subset.params, x, y), mlp_loss(params, x, y), rtol=1e-6)
    report = compute_influence(subset.loss, subset.params, x, y, x[0], y[0], l2=0.03, damping=0.1,
                               batch_size=BATCH_SIZE)
    assert report.converged
    assert report.scores.shape == (N_TRAIN,)


def test_subset_rejects_empty_selection(mlp_problem):
    from detectors.subset import restrict_to_subset

    params, _, _ = mlp_problem
    with pytest.raises(ValueError, match="subset is empty"):
        restrict_to_subset(mlp_loss, params, lambda path: False)
