"""Attack drills: plant known poisons so that detectors can be tested against them.

Each drill acts as the threat model's attacker. It uses the model's
architecture and training procedure, computes gradients of the loss with
respect to the input, and adds a few crafted examples to the training set.
A drill reports whether its attack worked. A failed attack is a valid result,
and the caller decides what to do with it.

Everything here is pure computation on arrays and pytrees.
"""

from __future__ import annotations

import functools
import math
from enum import Enum
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from detectors.influence import incident_gradient, score_training_examples
from detectors.ranking import example_gradient_norms

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]
TrainFn = Callable[[np.ndarray, np.ndarray], Params]

DEFAULT_CRAFT_STEPS = 10


class AttackOutcome(NamedTuple):
    """The result of one planted attack.

    Attributes:
        poisoned_x: the training inputs with the poisons inserted,
            shape ``(N + P, *input_shape)``.
        poisoned_y: the labels, shape ``(N + P,)``. Poison rows carry the
            attacker's class.
        poison_indices: the rows of ``poisoned_x`` that are poisons, shape
            ``(P,)``, int64, ascending.
        params: the parameters retrained from scratch on the poisoned set.
        succeeded: whether the retrained model predicts the attacker's class
            on the target with probability at least the confidence threshold.
        target_confidence: the retrained model's probability of the attacker's
            class on the target.
        target_prediction: the retrained model's predicted class for the target.
    """

    poisoned_x: np.ndarray
    poisoned_y: np.ndarray
    poison_indices: np.ndarray
    params: Params
    succeeded: bool
    target_confidence: float
    target_prediction: int


def craft_dirty_label_poisons(
    apply: ApplyFn,
    params: Params,
    target_x: np.ndarray,
    attacker_class: int,
    *,
    num_poisons: int,
    epsilon: float,
    key: jax.Array,
    steps: int = DEFAULT_CRAFT_STEPS,
    step_size: float | None = None,
    clip: tuple[float, float] = (0.0, 1.0),
) -> np.ndarray:
    """Craft near-copies of the target that, trained on as ``attacker_class``, flip the target.

    Each poison starts at a uniformly random point of the L-infinity ball of
    radius ``epsilon`` around the target. Then ``steps`` projected signed-gradient
    steps align the poisons' parameter gradient with the target's (gradient
    matching): both are gradients of the softmax cross-entropy of
    ``attacker_class`` under ``apply`` at ``params``, and the steps maximise
    their cosine similarity. A training step on the poisons then also lowers the
    target's loss for ``attacker_class``. After every step the poisons are
    projected back onto the ball and into ``clip``. The caller labels them
    ``attacker_class``, which makes them dirty-label poisons.

    Steps that merely make ``apply`` predict ``attacker_class`` on the poisons
    work against the attacker, because the retrained model can then fit the
    poisons by a small change that does not reach the target. On the demo's
    digits MLP, such poisons flipped none of 10 targets that random
    near-copies flipped.

    Args:
        apply: ``apply(params, x) -> logits`` with ``x`` of shape
            ``(B, *input_shape)`` and logits ``(B, num_classes)``.
        params: the parameters the attacker crafts against (usually the clean model's).
        target_x: the input to be misclassified, shape ``input_shape``, inside ``clip``.
        attacker_class: the class the attacker wants for the target, in
            ``[0, num_classes)``.
        num_poisons: number of poisons ``P``, at least 1.
        epsilon: L-infinity radius of the ball around the target, greater than 0.
        key: a ``jax.random`` key for the random starts.
        steps: number of signed-gradient steps, at least 0. With 0 the poisons
            are the random starts.
        step_size: size of one signed-gradient step. Defaults to
            ``2.5 * epsilon / steps``, so that the steps together can cross the
            ball's diameter of ``2 * epsilon``.
        clip: the ``(low, high)`` range of valid input values, with ``low < high``.

    Returns:
        The poisons, shape ``(P, *input_shape)``, float32. Every value lies
        within ``epsilon`` of the target's value and inside ``clip``.

    Raises:
        ValueError: an argument is outside its allowed range. The message names
            the argument, the value and the range.
    """
    target = np.asarray(target_x, dtype=np.float32)
    low, high = _validate_clip(clip)
    _validate_target(target, low, high)
    _validate_at_least("num_poisons", num_poisons, 1)
    _validate_at_least("steps", steps, 0)
    _validate_positive("epsilon", epsilon)
    num_classes = _infer_num_classes(apply, params, target.shape)
    _validate_class(attacker_class, num_classes)
    if step_size is None:
        step_size = 2.5 * epsilon / max(steps, 1)
    _validate_positive("step_size", step_size)

    craft = _build_craft(apply, num_poisons=num_poisons, steps=steps, low=low, high=high)
    poisons = craft(params, jnp.asarray(target), attacker_class, epsilon, step_size, key)
    return np.asarray(poisons, dtype=np.float32)


def plant_dirty_label_attack(
    train_fn: TrainFn,
    apply: ApplyFn,
    clean_params: Params,
    train_x: np.ndarray,
    train_y: np.ndarray,
    target_x: np.ndarray,
    attacker_class: int,
    *,
    num_poisons: int,
    epsilon: float,
    key: jax.Array,
    confidence_threshold: float = 0.9,
    steps: int = DEFAULT_CRAFT_STEPS,
    clip: tuple[float, float] = (0.0, 1.0),
) -> AttackOutcome:
    """Plant dirty-label poisons for one target, retrain, and report whether the attack worked.

    The poisons come from :func:`craft_dirty_label_poisons` against
    ``clean_params`` and are labelled ``attacker_class``. They are inserted at
    random rows (drawn from ``key``), so no detector can find them by their
    position. The clean rows keep their relative order. Then ``train_fn``
    retrains from scratch on the poisoned set.

    Args:
        train_fn: ``train_fn(x, y) -> params``, training from scratch with the
            same initialisation and hyperparameters as the clean model.
        apply: ``apply(params, x) -> logits``, batched.
        clean_params: the clean model's parameters, which the poisons are crafted against.
        train_x: clean training inputs, shape ``(N, *input_shape)``.
        train_y: clean integer labels, shape ``(N,)``.
        target_x: the input to be misclassified, shape ``input_shape``.
        attacker_class: the class the attacker wants for the target.
        num_poisons: number of poisons, at least 1.
        epsilon: L-infinity radius of the poisons around the target, greater than 0.
        key: a ``jax.random`` key for crafting and for the insertion rows.
        confidence_threshold: the probability of ``attacker_class`` on the target
            that counts as success, in ``(0, 1]``.
        steps: signed-gradient steps per poison, at least 0.
        clip: the ``(low, high)`` range of valid input values.

    Returns:
        An :class:`AttackOutcome`. ``succeeded`` is False when the retrained model
        does not predict ``attacker_class`` on the target, or predicts it with
        probability below ``confidence_threshold``.

    Raises:
        ValueError: an argument is outside its allowed range, or the arrays'
            shapes disagree.
    """
    train_x = np.asarray(train_x)
    train_y = np.asarray(train_y)
    target = np.asarray(target_x, dtype=np.float32)
    _validate_training_set(train_x, train_y, target)
    if not 0.0 < confidence_threshold <= 1.0:
        raise ValueError(f"confidence_threshold must be in (0, 1], got {confidence_threshold}")

    craft_key, rows_key = jax.random.split(key)
    poisons = craft_dirty_label_poisons(
        apply,
        clean_params,
        target,
        attacker_class,
        num_poisons=num_poisons,
        epsilon=epsilon,
        key=craft_key,
        steps=steps,
        clip=clip,
    )
    poisoned_x, poisoned_y, poison_indices = _insert_at_random_rows(
        train_x, train_y, poisons, attacker_class, rows_key
    )

    params = train_fn(poisoned_x, poisoned_y)
    logits = apply(params, jnp.asarray(target)[None])
    probabilities = np.asarray(jax.nn.softmax(logits[0]))
    target_prediction = int(np.argmax(probabilities))
    target_confidence = float(probabilities[attacker_class])
    succeeded = target_prediction == attacker_class and target_confidence >= confidence_threshold
    return AttackOutcome(
        poisoned_x=poisoned_x,
        poisoned_y=poisoned_y,
        poison_indices=poison_indices,
        params=params,
        succeeded=succeeded,
        target_confidence=target_confidence,
        target_prediction=target_prediction,
    )


def _gradient_alignment(apply: ApplyFn, steps: int):
    """Build the traceable gradient-matching loop shared by the dirty-label and clean-label crafts.

    The returned ``align(params, target, start, lower, upper, label, step_size)``
    takes ``steps`` projected signed-gradient steps from ``start`` that lower one
    minus the cosine between the poisons' parameter gradient and the target's,
    both of the summed cross-entropy of ``label``. After every step the poisons
    are clipped into ``[lower, upper]``.
    """

    def attacker_loss(params, x, label):
        logits = apply(params, x)
        labels = jnp.full((x.shape[0],), label, dtype=jnp.int32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()

    def parameter_gradient(params, x, label):
        return ravel_pytree(jax.grad(attacker_loss)(params, x, label))[0]

    def misalignment(poisons, params, target_gradient, label):
        poison_gradient = parameter_gradient(params, poisons, label)
        # The tiny constant keeps the cosine finite when a gradient vanishes,
        # for instance when the model already puts the target in the label's class.
        norms = jnp.linalg.norm(poison_gradient) * jnp.linalg.norm(target_gradient) + 1e-12
        return 1.0 - jnp.dot(poison_gradient, target_gradient) / norms

    def align(params, target, start, lower, upper, label, step_size):
        target_gradient = parameter_gradient(params, target[None], label)

        def step(_, poisons):
            gradient = jax.grad(misalignment)(poisons, params, target_gradient, label)
            return jnp.clip(poisons - step_size * jnp.sign(gradient), lower, upper)

        return jax.lax.fori_loop(0, steps, step, start)

    return align


def _build_craft(apply: ApplyFn, *, num_poisons: int, steps: int, low: float, high: float):
    """Build the jitted crafting loop for one ``apply``, number of poisons and number of steps."""
    align = _gradient_alignment(apply, steps)

    @jax.jit
    def craft(params, target, attacker_class, epsilon, step_size, key):
        lower = jnp.maximum(target - epsilon, low)
        upper = jnp.minimum(target + epsilon, high)
        offsets = jax.random.uniform(
            key, (num_poisons, *target.shape), minval=-epsilon, maxval=epsilon
        )
        start = jnp.clip(target + offsets, lower, upper)
        return align(params, target, start, lower, upper, attacker_class, step_size)

    return craft


def _insert_at_random_rows(
    train_x: np.ndarray,
    train_y: np.ndarray,
    poisons: np.ndarray,
    attacker_class: int,
    key: jax.Array,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Insert the poisons at random rows and return the new inputs, labels and poison rows."""
    total = len(train_x) + len(poisons)
    permutation = np.asarray(jax.random.permutation(key, total))
    poison_indices = np.sort(permutation[: len(poisons)]).astype(np.int64)
    is_poison = np.zeros(total, dtype=bool)
    is_poison[poison_indices] = True

    poisoned_x = np.empty((total, *train_x.shape[1:]), dtype=train_x.dtype)
    poisoned_x[is_poison] = poisons
    poisoned_x[~is_poison] = train_x
    poisoned_y = np.empty(total, dtype=train_y.dtype)
    poisoned_y[is_poison] = attacker_class
    poisoned_y[~is_poison] = train_y
    return poisoned_x, poisoned_y, poison_indices


def _infer_num_classes(apply: ApplyFn, params: Params, input_shape: tuple[int, ...]) -> int:
    batch = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    logits = jax.eval_shape(apply, params, batch)
    if len(logits.shape) != 2 or logits.shape[0] != 1:
        raise ValueError(
            f"apply must return logits of shape (batch, num_classes), got {logits.shape} for a batch of 1"
        )
    return int(logits.shape[1])


def _validate_clip(clip: tuple[float, float]) -> tuple[float, float]:
    low, high = (float(bound) for bound in clip)
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"clip must be a finite (low, high) range with low < high, got {tuple(clip)}")
    return low, high


def _validate_target(target: np.ndarray, low: float, high: float) -> None:
    if not np.all(np.isfinite(target)):
        raise ValueError("target_x contains NaN or infinite values")
    if target.size and (target.min() < low or target.max() > high):
        raise ValueError(
            f"target_x values must lie in clip range [{low}, {high}], "
            f"got values in [{target.min()}, {target.max()}]"
        )


def _validate_training_set(train_x: np.ndarray, train_y: np.ndarray, target: np.ndarray) -> None:
    if train_y.ndim != 1 or len(train_y) != len(train_x):
        raise ValueError(
            f"train_y must have shape ({len(train_x)},) to match train_x, got {train_y.shape}"
        )
    if not np.issubdtype(train_y.dtype, np.integer):
        raise ValueError(f"train_y must contain integer labels, got dtype {train_y.dtype}")
    if train_x.shape[1:] != target.shape:
        raise ValueError(
            f"target_x must have the shape of one training input {train_x.shape[1:]}, got {target.shape}"
        )
    if not np.all(np.isfinite(train_x)):
        raise ValueError("train_x contains NaN or infinite values")


def _validate_at_least(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _validate_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _validate_class(attacker_class: int, num_classes: int) -> None:
    if isinstance(attacker_class, bool) or not isinstance(attacker_class, (int, np.integer)):
        raise ValueError(f"attacker_class must be an integer in [0, {num_classes}), got {attacker_class!r}")
    if not 0 <= attacker_class < num_classes:
        raise ValueError(f"attacker_class must be in [0, {num_classes}), got {attacker_class}")


# Clean-label drills: the poisons keep their correct labels.


class CleanLabelMethod(str, Enum):
    """The crafting method of :func:`plant_clean_label_attack`."""

    FEATURE_COLLISION = "feature-collision"
    GRADIENT_MATCHING = "gradient-matching"


class BaseSelection(str, Enum):
    """The rule by which :func:`plant_clean_label_attack` picks the training examples it perturbs.

    ``NEAREST`` takes the attacker-class examples closest to the target in
    input space. ``LARGEST_GRADIENT`` takes those whose loss has the largest
    parameter gradient under the attacker's model. Later gradient-matching
    work selects poisons this way (Souri et al., 2022, "Sleeper Agent"),
    because such examples stay hard to fit and so keep some pull on the
    parameters.
    """

    NEAREST = "nearest"
    LARGEST_GRADIENT = "largest-gradient"


def nearest_bases(train_x: np.ndarray, train_y: np.ndarray, target_x: np.ndarray, attacker_class: int, count: int) -> np.ndarray:
    """Return the rows of the ``count`` training examples of ``attacker_class`` nearest the target (L2, input space)."""
    candidates = np.flatnonzero(train_y == attacker_class)
    if len(candidates) < count:
        raise ValueError(
            f"num_poisons={count} exceeds the {len(candidates)} training examples of class {attacker_class}"
        )
    distances = np.linalg.norm((train_x[candidates] - target_x).reshape(len(candidates), -1), axis=1)
    return np.sort(candidates[np.argsort(distances, kind="stable")[:count]]).astype(np.int64)


def largest_gradient_bases(
    apply: ApplyFn, params: Params, train_x: np.ndarray, train_y: np.ndarray, attacker_class: int, count: int
) -> np.ndarray:
    """Return the rows of the ``count`` examples of ``attacker_class`` whose loss gradient is largest.

    The gradient is that of the example's cross-entropy with respect to
    ``params``. Rows come back ascending.
    """
    candidates = np.flatnonzero(train_y == attacker_class)
    if len(candidates) < count:
        raise ValueError(
            f"num_poisons={count} exceeds the {len(candidates)} training examples of class {attacker_class}"
        )
    inputs = np.asarray(train_x[candidates], np.float32)
    norms = example_gradient_norms(_cross_entropy_loss(apply), params, inputs, np.asarray(train_y[candidates]))
    return np.sort(candidates[np.argsort(-norms, kind="stable")[:count]]).astype(np.int64)


@functools.lru_cache(maxsize=32)
def _cross_entropy_loss(apply: ApplyFn):
    """Build the per-example cross-entropy of ``apply``, one object per ``apply`` so jitted helpers compile once."""

    def loss(params, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y)

    return loss


def _alignment_terms(apply: ApplyFn, params: Params, target: np.ndarray, label: int, poisons: np.ndarray) -> np.ndarray:
    """Return ``g_i . g_t`` for every poison, up to one common positive factor, in float64."""
    loss = _cross_entropy_loss(apply)
    labels = np.full(len(poisons), label, dtype=np.int32)
    target_gradient = incident_gradient(loss, params, target, np.int32(label))
    return np.asarray(score_training_examples(loss, params, target_gradient, poisons, labels), np.float64)


def craft_feature_collision_poisons(
    embed: ApplyFn,
    params: Params,
    target_x: np.ndarray,
    base_x: np.ndarray,
    *,
    epsilon: float,
    steps: int = 100,
    step_size: float | None = None,
    clip: tuple[float, float] = (0.0, 1.0),
) -> np.ndarray:
    """Perturb base images so that their features collide with the target's (Shafahi et al., 2018, "Poison Frogs!").

    Each poison minimises ``||embed(params, x_p) - embed(params, target)||²`` by
    projected signed-gradient steps inside the L-infinity ball of radius
    ``epsilon`` around its base image and inside ``clip``. The bases belong to
    the attacker's class and keep that label, so a human reviewer finds
    correctly labelled images. A model that trains on them learns to put the
    target's features into the attacker's class. The attack is strongest
    when the victim retrains only the layers after ``embed`` (transfer learning).

    Args:
        embed: ``embed(params, x) -> (B, D)`` penultimate features.
        params: the parameters the attacker crafts against.
        target_x: shape ``input_shape``.
        base_x: ``(P, *input_shape)`` base images of the attacker's class.
        epsilon: L-infinity budget, > 0.
        steps: signed-gradient steps, >= 0.
        step_size: defaults to ``2.5 * epsilon / steps``.
        clip: valid input range.

    Returns:
        float32 ``(P, *input_shape)`` poisons within ``epsilon`` of their bases.
    """
    target, bases, low, high, step_size = _clean_label_arguments(target_x, base_x, epsilon, steps, step_size, clip)
    collide = _build_collision(embed, steps=steps, low=low, high=high)
    return np.asarray(collide(params, jnp.asarray(target), jnp.asarray(bases), epsilon, step_size), np.float32)


def _clean_label_arguments(target_x, base_x, epsilon: float, steps: int, step_size: float | None, clip):
    """Validate the arguments shared by the clean-label crafts; return the arrays, clip range and step size."""
    target = np.asarray(target_x, np.float32)
    bases = np.asarray(base_x, np.float32)
    low, high = _validate_clip(clip)
    _validate_target(target, low, high)
    _validate_at_least("steps", steps, 0)
    _validate_positive("epsilon", epsilon)
    if bases.ndim != target.ndim + 1 or bases.shape[1:] != target.shape or len(bases) == 0:
        raise ValueError(f"base_x must have shape (P, *{target.shape}) with P >= 1, got {bases.shape}")
    if step_size is None:
        step_size = 2.5 * epsilon / max(steps, 1)
    _validate_positive("step_size", step_size)
    return target, bases, low, high, step_size


def _build_collision(embed: ApplyFn, *, steps: int, low: float, high: float):
    def distance(poisons, params, target_features):
        return jnp.sum((embed(params, poisons) - target_features) ** 2)

    @jax.jit
    def collide(params, target, bases, epsilon, step_size):
        lower = jnp.maximum(bases - epsilon, low)
        upper = jnp.minimum(bases + epsilon, high)
        target_features = embed(params, target[None])

        def step(_, poisons):
            gradient = jax.grad(distance)(poisons, params, target_features)
            return jnp.clip(poisons - step_size * jnp.sign(gradient), lower, upper)

        return jax.lax.fori_loop(0, steps, step, bases)

    return collide


def craft_gradient_matching_poisons(
    apply: ApplyFn,
    params: Params,
    target_x: np.ndarray,
    attacker_class: int,
    base_x: np.ndarray,
    *,
    epsilon: float,
    steps: int = 100,
    step_size: float | None = None,
    clip: tuple[float, float] = (0.0, 1.0),
) -> np.ndarray:
    """Perturb base images so that their training gradient aligns with the target's adversarial gradient.

    This is the gradient matching of Geiping et al. (2021, "Witches' Brew").
    The adversarial gradient is ``∇θ loss(target, attacker_class)``. The poisons'
    gradient is that of their own (correct) label, ``attacker_class``. Projected
    signed-gradient steps inside the L-infinity ball of radius ``epsilon``
    around each base maximise the cosine similarity of the two, so a training
    step on the poisons also moves the target towards ``attacker_class``.

    Args:
        apply: ``apply(params, x) -> logits``.
        params: the parameters the attacker crafts against.
        target_x: shape ``input_shape``.
        attacker_class: the label of the bases and the class the attacker wants.
        base_x: ``(P, *input_shape)`` base images of ``attacker_class``.
        epsilon: L-infinity budget, > 0.
        steps: signed-gradient steps, >= 0.
        step_size: defaults to ``2.5 * epsilon / steps``.
        clip: valid input range.

    Returns:
        float32 ``(P, *input_shape)`` poisons within ``epsilon`` of their bases.
    """
    target, bases, low, high, step_size = _clean_label_arguments(target_x, base_x, epsilon, steps, step_size, clip)
    _validate_class(attacker_class, _infer_num_classes(apply, params, target.shape))
    craft = _build_matching(apply, steps=steps, low=low, high=high)
    return np.asarray(craft(params, jnp.asarray(target), jnp.asarray(bases), attacker_class, epsilon, step_size), np.float32)


def alignment_shares(
    apply: ApplyFn, params: Params, target_x: np.ndarray, attacker_class: int, poisons: np.ndarray
) -> np.ndarray:
    """Return each poison's share of the alignment that gradient matching builds, under ``params``.

    Gradient matching aligns the *sum* of the poisons' parameter gradients
    with the target's adversarial gradient ``g_t`` (both of the cross-entropy
    of ``attacker_class``). Poison ``i`` adds ``g_i . g_t`` to that sum, and its
    share is that term over the whole sum. Under the attacker's model
    (``params``), a poison the model already fits with near-zero loss has
    ``g_i`` near zero, so its share is near zero: the crafting objective does
    not use it, whatever its perturbation.

    Args:
        apply: ``apply(params, x) -> logits``.
        params: the parameters the poisons were crafted against.
        target_x: the input to be misclassified.
        attacker_class: the class the attacker wants for the target.
        poisons: ``(P, *input_shape)`` poisons, labelled ``attacker_class``.

    Returns:
        float64 ``(P,)`` shares that sum to 1.

    Raises:
        ValueError: on invalid shapes, values or class, or if the summed
            alignment is not positive, so shares mean nothing.
    """
    target = np.asarray(target_x, np.float32)
    poisons = np.asarray(poisons, np.float32)
    if poisons.ndim != target.ndim + 1 or poisons.shape[1:] != target.shape or len(poisons) == 0:
        raise ValueError(
            f"poisons must have shape (P, *target_x.shape) = (P, *{target.shape}) with P >= 1, got {poisons.shape}"
        )
    if not (np.all(np.isfinite(target)) and np.all(np.isfinite(poisons))):
        raise ValueError("target_x or poisons contain NaN or infinite values")
    _validate_class(attacker_class, _infer_num_classes(apply, params, target.shape))
    terms = _alignment_terms(apply, params, target, attacker_class, poisons)
    total = terms.sum()
    if not total > 0.0:
        raise ValueError(
            f"the poisons' summed gradient does not point along the target's (dot product {total:.3g}), "
            "so shares are undefined"
        )
    return terms / total


def _build_matching(apply: ApplyFn, *, steps: int, low: float, high: float):
    align = _gradient_alignment(apply, steps)

    @jax.jit
    def craft(params, target, bases, label, epsilon, step_size):
        lower = jnp.maximum(bases - epsilon, low)
        upper = jnp.minimum(bases + epsilon, high)
        return align(params, target, bases, lower, upper, label, step_size)

    return craft


def plant_clean_label_attack(
    method: CleanLabelMethod | str,
    train_fn: TrainFn,
    apply: ApplyFn,
    clean_params: Params,
    train_x: np.ndarray,
    train_y: np.ndarray,
    target_x: np.ndarray,
    attacker_class: int,
    *,
    num_poisons: int,
    epsilon: float,
    embed: ApplyFn | None = None,
    steps: int = 100,
    confidence_threshold: float = 0.5,
    clip: tuple[float, float] = (0.0, 1.0),
    bases: BaseSelection | str = BaseSelection.NEAREST,
    min_alignment_share: float = 0.0,
) -> AttackOutcome:
    """Perturb ``num_poisons`` training examples of ``attacker_class``, retrain, and report success.

    ``bases`` picks the examples (:class:`BaseSelection`): by default the
    ``num_poisons`` closest to the target in input space. They are replaced in
    place by their poisoned versions, labels unchanged, so ``poison_indices``
    are the bases' rows and the training set keeps its size.

    With ``min_alignment_share`` > 0, gradient matching plants only the
    poisons whose :func:`alignment_shares` under ``clean_params`` reach it.
    The others stay clean: their gradient under the attacker's model is near
    zero, so the crafting did not use them, and planting them would only
    leave more modified images to be found. Two cases plant more. The poison
    with the largest share is always planted, even when its share is below
    the threshold. When the shares are undefined (the summed alignment is
    not positive), every poison is planted.

    Args:
        method: :class:`CleanLabelMethod`. Feature collision needs ``embed``.
        train_fn: ``train_fn(x, y) -> params``, the victim's training.
        apply: ``apply(params, x) -> logits``.
        clean_params: the parameters the attacker crafts against.
        train_x, train_y: the clean training set.
        target_x: the input to be misclassified.
        attacker_class: the class the attacker wants for the target.
        num_poisons: how many training examples to perturb, >= 1.
        epsilon: L-infinity budget per pixel, > 0.
        embed: ``embed(params, x) -> features``, for feature collision.
        steps: crafting steps.
        confidence_threshold: probability of ``attacker_class`` on the target
            that counts as success, in ``(0, 1]``.
        clip: valid input range.
        bases: :class:`BaseSelection`, how the perturbed examples are chosen.
        min_alignment_share: for gradient matching, the share of the
            crafted alignment below which a poison is not planted, in
            ``[0, 1)``, with the two exceptions above. 0 plants every poison.

    Returns:
        An :class:`AttackOutcome`; ``poisoned_y`` equals ``train_y``.
    """
    method = CleanLabelMethod(method)
    if bases not in [selection.value for selection in BaseSelection]:
        choices = ", ".join(selection.value for selection in BaseSelection)
        raise ValueError(f"bases must be one of {choices}, got {bases!r}")
    bases = BaseSelection(bases)
    train_x = np.asarray(train_x)
    train_y = np.asarray(train_y)
    target = np.asarray(target_x, dtype=np.float32)
    _validate_training_set(train_x, train_y, target)
    _validate_at_least("num_poisons", num_poisons, 1)
    _validate_class(attacker_class, _infer_num_classes(apply, clean_params, target.shape))
    if not 0.0 < confidence_threshold <= 1.0:
        raise ValueError(f"confidence_threshold must be in (0, 1], got {confidence_threshold}")
    if method is CleanLabelMethod.FEATURE_COLLISION and embed is None:
        raise ValueError("feature collision needs embed(params, x) -> features")
    if (isinstance(min_alignment_share, bool) or not isinstance(min_alignment_share, (int, float, np.integer, np.floating))
            or not 0.0 <= min_alignment_share < 1.0):
        raise ValueError(f"min_alignment_share must be a number in [0, 1), got {min_alignment_share!r}")
    if min_alignment_share > 0.0 and method is not CleanLabelMethod.GRADIENT_MATCHING:
        raise ValueError("min_alignment_share applies to gradient matching only")

    if bases is BaseSelection.NEAREST:
        rows = nearest_bases(train_x, train_y, target, attacker_class, num_poisons)
    else:
        rows = largest_gradient_bases(apply, clean_params, train_x, train_y, attacker_class, num_poisons)
    if method is CleanLabelMethod.FEATURE_COLLISION:
        poisons = craft_feature_collision_poisons(
            embed, clean_params, target, train_x[rows], epsilon=epsilon, steps=steps, clip=clip
        )
    else:
        poisons = craft_gradient_matching_poisons(
            apply, clean_params, target, attacker_class, train_x[rows], epsilon=epsilon, steps=steps, clip=clip
        )
        if min_alignment_share > 0.0:
            rows, poisons = _used_poisons(apply, clean_params, target, attacker_class, rows, poisons,
                                          min_alignment_share)
    poisoned_x = train_x.copy()
    poisoned_x[rows] = poisons
    params = train_fn(poisoned_x, train_y)
    return _outcome(apply, params, target, attacker_class, confidence_threshold, poisoned_x, train_y.copy(), rows)


def _used_poisons(apply, params, target, attacker_class, rows, poisons, min_share):
    """Keep the poisons whose alignment share reaches ``min_share``, or all of them if shares mean nothing."""
    terms = _alignment_terms(apply, params, target, attacker_class, poisons)
    total = terms.sum()
    if not total > 0.0:
        # The crafting found no alignment at all. No share then separates used
        # poisons from unused ones, and retraining will report the attack as failed.
        return rows, poisons
    shares = terms / total
    used = shares >= min_share
    # The largest share is at least 1 / P, so with min_share above that an
    # attack could prune every poison. It keeps the largest one instead.
    used[np.argmax(shares)] = True
    return rows[used], poisons[used]


def _outcome(apply, params, target, attacker_class, confidence_threshold, poisoned_x, poisoned_y, rows) -> AttackOutcome:
    logits = apply(params, jnp.asarray(target)[None])
    probabilities = np.asarray(jax.nn.softmax(logits[0]))
    prediction = int(np.argmax(probabilities))
    confidence = float(probabilities[attacker_class])
    return AttackOutcome(
        poisoned_x=poisoned_x,
        poisoned_y=poisoned_y,
        poison_indices=rows,
        params=params,
        succeeded=prediction == attacker_class and confidence >= confidence_threshold,
        target_confidence=confidence,
        target_prediction=prediction,
    )
