"""Tests for detectors.attacks on small models that train in well under a second."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from detectors.attacks import (
    BaseSelection,
    alignment_shares,
    CleanLabelMethod,
    craft_dirty_label_poisons,
    craft_feature_collision_poisons,
    craft_gradient_matching_poisons,
    largest_gradient_bases,
    plant_clean_label_attack,
    plant_dirty_label_attack,
)

NUM_CLASSES = 3
INPUT_SHAPE = (2, 2)
# One centre per class in [0, 1]^4, far enough apart for a linear model.
CENTRES = np.array([[0.2, 0.2, 0.8, 0.8], [0.8, 0.2, 0.2, 0.8], [0.5, 0.8, 0.5, 0.2]], np.float32)
# Temperature of the soft nearest-neighbour model: the nearest training
# example dominates the logits when it is much closer than the others.
TEMPERATURE = 1e-3


def make_blobs(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    x = np.clip(CENTRES[y] + rng.normal(scale=0.05, size=(n, 4)), 0.0, 1.0)
    return x.reshape(n, *INPUT_SHAPE).astype(np.float32), y


def linear_apply(params, x):
    return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]


def train_linear(x: np.ndarray, y: np.ndarray) -> dict:
    params = {"w": jnp.zeros((4, NUM_CLASSES)), "b": jnp.zeros(NUM_CLASSES)}
    optimizer = optax.adam(0.1)

    def objective(p):
        losses = optax.softmax_cross_entropy_with_integer_labels(linear_apply(p, x), y)
        return losses.mean() + 0.5e-2 * sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(p))

    def step(carry, _):
        p, state = carry
        updates, state = optimizer.update(jax.grad(objective)(p), state)
        return (optax.apply_updates(p, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=200)
    return params


def nearest_neighbour_apply(params, x):
    """Logits of a soft nearest-neighbour classifier whose params are its training set."""
    queries = x.reshape(x.shape[0], -1)
    memory = params["x"].reshape(params["x"].shape[0], -1)
    squared_distances = jnp.sum((queries[:, None, :] - memory[None, :, :]) ** 2, axis=-1)
    return jax.nn.logsumexp(
        -squared_distances[:, :, None] / TEMPERATURE, axis=1, b=params["one_hot"][None]
    )


def train_nearest_neighbour(x: np.ndarray, y: np.ndarray) -> dict:
    return {"x": jnp.asarray(x), "one_hot": jax.nn.one_hot(y, NUM_CLASSES)}


@pytest.fixture(scope="module")
def blobs():
    return make_blobs(0, 90)


@pytest.fixture(scope="module")
def linear_params(blobs):
    return train_linear(*blobs)


@pytest.fixture(scope="module")
def target(blobs):
    """A class-0 input with one pixel at each end of the clip range."""
    x = CENTRES[0].copy()
    x[0], x[3] = 0.0, 1.0
    return x.reshape(INPUT_SHAPE)


def craft(linear_params, target, **overrides):
    arguments = dict(num_poisons=4, epsilon=0.05, key=jax.random.key(0), steps=5)
    arguments.update(overrides)
    attacker_class = arguments.pop("attacker_class", 1)
    return craft_dirty_label_poisons(linear_apply, linear_params, target, attacker_class, **arguments)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        pytest.param({"num_poisons": 0}, r"num_poisons must be an integer >= 1, got 0", id="no-poisons"),
        pytest.param({"epsilon": 0.0}, r"epsilon must be a finite number > 0, got 0.0", id="zero-epsilon"),
        pytest.param({"epsilon": float("nan")}, r"epsilon must be a finite number > 0", id="nan-epsilon"),
        pytest.param({"steps": -1}, r"steps must be an integer >= 0, got -1", id="negative-steps"),
        pytest.param({"step_size": -0.1}, r"step_size must be a finite number > 0", id="negative-step-size"),
        pytest.param({"attacker_class": 3}, r"attacker_class must be in \[0, 3\), got 3", id="class-too-large"),
        pytest.param({"attacker_class": -1}, r"attacker_class must be in \[0, 3\), got -1", id="negative-class"),
        pytest.param({"attacker_class": 1.0}, r"attacker_class must be an integer in \[0, 3\)", id="float-class"),
        pytest.param({"clip": (1.0, 0.0)}, r"clip must be a finite \(low, high\) range", id="reversed-clip"),
        pytest.param(
            {"clip": (0.0, 0.5)}, r"target_x values must lie in clip range \[0.0, 0.5\]", id="target-outside-clip"
        ),
    ],
)
def test_craft_rejects_invalid_argument(linear_params, target, overrides, match):
    with pytest.raises(ValueError, match=match):
        craft(linear_params, target, **overrides)


def test_poisons_stay_within_epsilon_and_clip(linear_params, target):
    poisons = craft(linear_params, target, num_poisons=6, epsilon=0.05, steps=10)

    assert poisons.shape == (6, *INPUT_SHAPE)
    assert poisons.dtype == np.float32
    assert np.max(np.abs(poisons - target)) <= 0.05 + 1e-6
    assert poisons.min() >= 0.0
    assert poisons.max() <= 1.0


def test_craft_is_deterministic_per_key(linear_params, target):
    first = craft(linear_params, target, key=jax.random.key(3))
    again = craft(linear_params, target, key=jax.random.key(3))
    other = craft(linear_params, target, key=jax.random.key(4))

    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_craft_steps_align_gradients(linear_params, target):
    def attacker_gradient(x):
        def loss(params):
            labels = jnp.full((x.shape[0],), 1)
            return optax.softmax_cross_entropy_with_integer_labels(linear_apply(params, x), labels).sum()

        return ravel_pytree(jax.grad(loss)(linear_params))[0]

    def cosine_to_target(poisons):
        a, b = attacker_gradient(poisons), attacker_gradient(target[None])
        return float(jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))

    random_starts = craft(linear_params, target, steps=0)
    crafted = craft(linear_params, target, steps=10)

    assert cosine_to_target(crafted) > cosine_to_target(random_starts)


def test_plant_inserts_poisons_at_reported_rows(blobs, target):
    train_x, train_y = blobs
    outcome = plant_dirty_label_attack(
        train_nearest_neighbour, nearest_neighbour_apply, train_nearest_neighbour(*blobs),
        train_x, train_y, target, 2, num_poisons=5, epsilon=0.05, key=jax.random.key(1),
    )

    indices = outcome.poison_indices
    is_poison = np.zeros(len(outcome.poisoned_y), dtype=bool)
    is_poison[indices] = True
    assert len(outcome.poisoned_x) == len(train_x) + 5
    assert indices.dtype == np.int64
    assert len(np.unique(indices)) == 5
    assert np.all(np.diff(indices) > 0)
    assert np.all(outcome.poisoned_y[indices] == 2)
    assert np.max(np.abs(outcome.poisoned_x[indices] - target)) <= 0.05 + 1e-6
    np.testing.assert_array_equal(outcome.poisoned_x[~is_poison], train_x)
    np.testing.assert_array_equal(outcome.poisoned_y[~is_poison], train_y)


def test_plant_succeeds_against_nearest_neighbour(blobs, target):
    outcome = plant_dirty_label_attack(
        train_nearest_neighbour, nearest_neighbour_apply, train_nearest_neighbour(*blobs),
        *blobs, target, 2, num_poisons=3, epsilon=0.05, key=jax.random.key(2),
    )

    assert outcome.succeeded
    assert outcome.target_prediction == 2
    assert outcome.target_confidence >= 0.9


def test_plant_reports_failed_attack(blobs, linear_params, target):
    # One poison barely off the target cannot outvote the class-0 blob
    # under a regularised linear model.
    outcome = plant_dirty_label_attack(
        train_linear, linear_apply, linear_params, *blobs, target, 1,
        num_poisons=1, epsilon=0.01, key=jax.random.key(0), steps=1,
    )

    assert not outcome.succeeded
    assert outcome.target_prediction == 0
    assert outcome.target_confidence < 0.9
    assert len(outcome.poison_indices) == 1


def test_plant_is_deterministic(blobs, linear_params, target):
    def plant():
        return plant_dirty_label_attack(
            train_linear, linear_apply, linear_params, *blobs, target, 1,
            num_poisons=3, epsilon=0.05, key=jax.random.key(5),
        )

    first, again = plant(), plant()

    np.testing.assert_array_equal(first.poisoned_x, again.poisoned_x)
    np.testing.assert_array_equal(first.poison_indices, again.poison_indices)
    np.testing.assert_array_equal(first.params["w"], again.params["w"])
    assert first.target_confidence == again.target_confidence


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        pytest.param(
            {"confidence_threshold": 0.0}, r"confidence_threshold must be in \(0, 1\], got 0.0", id="zero-threshold"
        ),
        pytest.param(
            {"confidence_threshold": 1.5}, r"confidence_threshold must be in \(0, 1\], got 1.5", id="threshold-above-one"
        ),
        pytest.param({"train_y": np.zeros(5, np.int32)}, r"train_y must have shape \(90,\)", id="short-labels"),
        pytest.param({"train_y": np.zeros(90, np.float32)}, r"train_y must contain integer labels", id="float-labels"),
        pytest.param(
            {"target_x": np.zeros(4, np.float32)}, r"target_x must have the shape of one training input", id="flat-target"
        ),
        pytest.param({"num_poisons": 0}, r"num_poisons must be an integer >= 1", id="no-poisons"),
    ],
)
def test_plant_rejects_invalid_argument(blobs, linear_params, target, overrides, match):
    arguments = dict(
        train_x=blobs[0], train_y=blobs[1], target_x=target, attacker_class=1,
        num_poisons=2, epsilon=0.05, key=jax.random.key(0),
    )
    arguments.update(overrides)
    with pytest.raises(ValueError, match=match):
        plant_dirty_label_attack(train_linear, linear_apply, linear_params, **arguments)


def mlp_params(seed=0):
    keys = jax.random.split(jax.random.key(seed), 2)
    return {"w1": jax.random.normal(keys[0], (4, 5)), "w2": jax.random.normal(keys[1], (5, NUM_CLASSES))}


def mlp_features(params, x):
    return jnp.tanh(x.reshape(x.shape[0], -1) @ params["w1"])


def mlp_apply(params, x):
    return mlp_features(params, x) @ params["w2"]


def test_feature_collision_moves_features_toward_target(blobs, target):
    params = mlp_params()
    bases = blobs[0][blobs[1] == 1][:3]
    poisons = craft_feature_collision_poisons(mlp_features, params, target, bases, epsilon=0.1, steps=30)

    def distance(x):
        return float(jnp.sum((mlp_features(params, x) - mlp_features(params, target[None])) ** 2))

    assert distance(poisons) < distance(bases)
    assert np.max(np.abs(poisons - bases)) <= 0.1 + 1e-6


def test_gradient_matching_raises_alignment(blobs, target):
    params = mlp_params()
    bases = blobs[0][blobs[1] == 1][:3]

    def cosine(x):
        def gradient(inputs):
            def total(p):
                labels = jnp.full((inputs.shape[0],), 1)
                return optax.softmax_cross_entropy_with_integer_labels(mlp_apply(p, inputs), labels).sum()

            return ravel_pytree(jax.grad(total)(params))[0]

        a, b = gradient(jnp.asarray(x)), gradient(jnp.asarray(target[None]))
        return float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))

    poisons = craft_gradient_matching_poisons(mlp_apply, params, target, 1, bases, epsilon=0.1, steps=30)

    assert cosine(poisons) > cosine(bases)
    assert np.max(np.abs(poisons - bases)) <= 0.1 + 1e-6


def test_clean_label_keeps_labels_and_size(blobs, target):
    train_x, train_y = blobs
    outcome = plant_clean_label_attack(
        CleanLabelMethod.GRADIENT_MATCHING, train_linear, linear_apply, train_linear(*blobs),
        train_x, train_y, target, 1, num_poisons=4, epsilon=0.05, steps=5,
    )

    np.testing.assert_array_equal(outcome.poisoned_y, train_y)
    assert len(outcome.poisoned_x) == len(train_x)
    assert np.all(train_y[outcome.poison_indices] == 1)
    assert len(outcome.poison_indices) == 4
    assert isinstance(outcome.succeeded, bool)


def test_largest_gradient_bases_match_loop(blobs, linear_params):
    train_x, train_y = blobs
    params = linear_params

    def norm(x):
        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(linear_apply(p, x[None]), jnp.array([2]))[0]

        return float(jnp.linalg.norm(ravel_pytree(jax.grad(loss)(params))[0]))

    candidates = np.flatnonzero(train_y == 2)
    norms = np.array([norm(jnp.asarray(train_x[row])) for row in candidates])
    expected = np.sort(candidates[np.argsort(-norms)[:5]])

    rows = largest_gradient_bases(linear_apply, params, train_x, train_y, 2, 5)

    np.testing.assert_array_equal(rows, expected)
    with pytest.raises(ValueError, match="exceeds the"):
        largest_gradient_bases(linear_apply, params, train_x, train_y, 2, len(candidates) + 1)


def test_clean_label_attack_uses_selected_bases(blobs, target, linear_params):
    train_x, train_y = blobs
    params = linear_params
    outcome = plant_clean_label_attack(
        CleanLabelMethod.GRADIENT_MATCHING, train_linear, linear_apply, params, train_x, train_y, target, 1,
        num_poisons=4, epsilon=0.05, steps=5, bases=BaseSelection.LARGEST_GRADIENT,
    )

    np.testing.assert_array_equal(
        outcome.poison_indices, largest_gradient_bases(linear_apply, params, train_x, train_y, 1, 4)
    )
    untouched = np.setdiff1d(np.arange(len(train_x)), outcome.poison_indices)
    np.testing.assert_array_equal(outcome.poisoned_x[untouched], train_x[untouched])
    with pytest.raises(ValueError, match="bases must be one of nearest, largest-gradient, got 'random'"):
        plant_clean_label_attack(
            CleanLabelMethod.GRADIENT_MATCHING, train_linear, linear_apply, params, train_x, train_y, target, 1,
            num_poisons=4, epsilon=0.05, steps=5, bases="random",
        )


def example_gradient(params, x, label):
    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(linear_apply(p, x[None]), jnp.array([label]))[0]

    return np.asarray(ravel_pytree(jax.grad(loss)(params))[0], np.float64)


def test_alignment_shares_match_a_loop(blobs, target, linear_params):
    train_x, train_y = blobs
    poisons = train_x[train_y == 1][:6]
    target_gradient = example_gradient(linear_params, jnp.asarray(target), 1)
    terms = np.array([example_gradient(linear_params, jnp.asarray(p), 1) @ target_gradient for p in poisons])

    shares = alignment_shares(linear_apply, linear_params, target, 1, poisons)

    np.testing.assert_allclose(shares, terms / terms.sum(), rtol=1e-4, atol=1e-6)
    assert shares.sum() == pytest.approx(1.0)


def test_alignment_shares_reject_zero_alignment(blobs, target, linear_params):
    train_x, train_y = blobs
    # Saturated logits: every class-1 example has exactly zero gradient.
    saturated = jax.tree.map(lambda leaf: leaf * 1e4, linear_params)

    with pytest.raises(ValueError, match="does not point along"):
        alignment_shares(linear_apply, saturated, target, 1, train_x[train_y == 1][:4])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"poisons": np.zeros((0, *INPUT_SHAPE), np.float32)}, "poisons must have shape"),
        ({"poisons": np.full((2, *INPUT_SHAPE), np.nan, np.float32)}, "NaN or infinite"),
        ({"attacker_class": NUM_CLASSES}, "attacker_class"),
        ({"attacker_class": -1}, "attacker_class"),
    ],
)
def test_alignment_shares_check_arguments(blobs, target, linear_params, change, message):
    train_x, train_y = blobs
    arguments = {"target_x": target, "attacker_class": 1, "poisons": train_x[train_y == 1][:3], **change}

    with pytest.raises(ValueError, match=message):
        alignment_shares(linear_apply, linear_params, **arguments)


def plant_matching(blobs, target, params, **options):
    """Plant an 8-poison gradient-matching attack on the blobs, for class 1."""
    return plant_clean_label_attack(
        CleanLabelMethod.GRADIENT_MATCHING, train_linear, linear_apply, params, *blobs, target, 1,
        num_poisons=8, epsilon=0.05, steps=5, **options,
    )


@pytest.fixture(scope="module")
def every_poison(blobs, target, linear_params):
    """The attack with every crafted poison planted, and each poison's alignment share."""
    outcome = plant_matching(blobs, target, linear_params)
    shares = alignment_shares(linear_apply, linear_params, target, 1, outcome.poisoned_x[outcome.poison_indices])
    return outcome, shares


def test_clean_label_attack_plants_used_poisons(blobs, target, linear_params, every_poison):
    train_x, _ = blobs
    every, all_shares = every_poison
    threshold = float(np.sort(all_shares)[3])  # between the 4th and 5th smallest share, so some are pruned

    pruned = plant_matching(blobs, target, linear_params, min_alignment_share=threshold)

    np.testing.assert_array_equal(pruned.poison_indices, every.poison_indices[all_shares >= threshold])
    assert 0 < len(pruned.poison_indices) < 8
    np.testing.assert_array_equal(pruned.poisoned_x[pruned.poison_indices], every.poisoned_x[pruned.poison_indices])
    restored = np.setdiff1d(every.poison_indices, pruned.poison_indices)
    np.testing.assert_array_equal(pruned.poisoned_x[restored], train_x[restored])


def test_clean_label_attack_keeps_the_largest_share(blobs, target, linear_params, every_poison):
    every, shares = every_poison
    assert shares.max() < 0.99

    pruned = plant_matching(blobs, target, linear_params, min_alignment_share=0.99)

    np.testing.assert_array_equal(pruned.poison_indices, every.poison_indices[[np.argmax(shares)]])


def test_clean_label_attack_plants_all_without_alignment(blobs, target, linear_params):
    train_x, train_y = blobs
    # Saturated logits give every class-1 example a zero gradient, so shares are undefined.
    saturated = jax.tree.map(lambda leaf: leaf * 1e4, linear_params)

    outcome = plant_clean_label_attack(
        CleanLabelMethod.GRADIENT_MATCHING, train_linear, linear_apply, saturated, train_x, train_y, target, 1,
        num_poisons=4, epsilon=0.05, steps=5, min_alignment_share=0.5,
    )

    assert len(outcome.poison_indices) == 4


@pytest.mark.parametrize(
    ("method", "share", "message"),
    [
        (CleanLabelMethod.GRADIENT_MATCHING, 1.0, r"must be a number in \[0, 1\)"),
        (CleanLabelMethod.GRADIENT_MATCHING, -0.1, r"must be a number in \[0, 1\)"),
        (CleanLabelMethod.GRADIENT_MATCHING, float("nan"), r"must be a number in \[0, 1\)"),
        (CleanLabelMethod.GRADIENT_MATCHING, "0.1", r"must be a number in \[0, 1\)"),
        (CleanLabelMethod.GRADIENT_MATCHING, np.float32(1.5), r"must be a number in \[0, 1\)"),
        (CleanLabelMethod.FEATURE_COLLISION, 0.1, "gradient matching only"),
    ],
)
def test_clean_label_attack_checks_min_alignment_share(blobs, target, linear_params, method, share, message):
    with pytest.raises(ValueError, match=message):
        plant_clean_label_attack(
            method, train_linear, linear_apply, linear_params, *blobs, target, 1, num_poisons=2, epsilon=0.05,
            embed=lambda params, x: x.reshape(x.shape[0], -1), min_alignment_share=share,
        )


def test_clean_label_attack_accepts_numpy_share(blobs, target, linear_params):
    outcome = plant_clean_label_attack(
        CleanLabelMethod.GRADIENT_MATCHING, train_linear, linear_apply, linear_params, *blobs, target, 1,
        num_poisons=4, epsilon=0.05, steps=5, min_alignment_share=np.float32(0.01),
    )

    assert 1 <= len(outcome.poison_indices) <= 4


def test_clean_label_attack_rejects_nan_training_input(blobs, target, linear_params):
    train_x, train_y = blobs
    broken = train_x.copy()
    broken[np.flatnonzero(train_y == 1)[0], 0, 0] = np.nan

    with pytest.raises(ValueError, match="train_x contains NaN or infinite values"):
        plant_clean_label_attack(
            CleanLabelMethod.GRADIENT_MATCHING, train_linear, linear_apply, linear_params, broken, train_y, target,
            1, num_poisons=2, epsilon=0.05,
        )


def test_clean_label_attack_checks_attacker_class(blobs, target, linear_params):
    with pytest.raises(ValueError, match=r"attacker_class must be in \[0, 3\), got 7"):
        plant_clean_label_attack(
            CleanLabelMethod.GRADIENT_MATCHING, train_linear, linear_apply, linear_params, *blobs, target, 7,
            num_poisons=2, epsilon=0.05,
        )


def test_clean_label_feature_collision_needs_embed(blobs, target):
    with pytest.raises(ValueError, match="feature collision needs embed"):
        plant_clean_label_attack(
            "feature-collision", train_linear, linear_apply, train_linear(*blobs), *blobs, target, 1,
            num_poisons=2, epsilon=0.05,
        )
