"""The demo: a Flax MLP on scikit-learn's digits, with one planted targeted attack.

:func:`build_demo` trains a clean model, picks a target in the production
split, plants a handful of dirty-label poisons for it with
:func:`detectors.attacks.plant_dirty_label_attack`, retrains, and writes the
poisoned model version to a work directory. :func:`load` is the loader that
the daemon's config names (``monitor.demo_model:load``) to read it back.

The digits data set (1,797 8x8 images of handwritten digits, 16 grey levels)
ships with scikit-learn, so the demo needs no network.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

from detectors.attacks import plant_dirty_label_attack
from monitor.errors import LoaderError
from monitor.loader import HeldOutSet, ModelBundle, TrainingSet

# Version of the files that build_demo writes, checked by load.
DEMO_FORMAT_VERSION = 1

INPUT_SHAPE = (8, 8)
NUM_CLASSES = 10
HIDDEN_SIZE = 64
L2 = 1e-3
LEARNING_RATE = 1e-2
DEFAULT_STEPS = 2000
DEFAULT_NUM_POISONS = 8
DEFAULT_EPSILON = 0.1
CONFIDENCE_THRESHOLD = 0.9
# How many production examples build_demo tries as the target before it gives up.
MAX_TARGET_CANDIDATES = 5

CLEAN_SOURCE = "sklearn-digits"
POISON_UPLOAD = 7
POISON_SOURCE = f"partner-upload-{POISON_UPLOAD:04d}"

PARAMS_FILE = "params.msgpack"
DATA_FILE = "data.npz"
META_FILE = "meta.json"


class DigitsMLP(nn.Module):
    """A one-hidden-layer tanh MLP: ``(B, 8, 8)`` inputs to ``(B, num_classes)`` logits."""

    hidden_size: int = HIDDEN_SIZE
    num_classes: int = NUM_CLASSES

    def setup(self) -> None:
        self.hidden = nn.Dense(self.hidden_size)
        self.head = nn.Dense(self.num_classes)

    def features(self, x: jax.Array) -> jax.Array:
        """Compute the penultimate features, shape ``(B, hidden_size)``."""
        return jnp.tanh(self.hidden(x.reshape(x.shape[0], -1)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


@dataclasses.dataclass(frozen=True)
class DigitsSplit:
    """The digits data set split into training, held-out and production examples.

    ``*_rows`` are the examples' row numbers in ``sklearn.datasets.load_digits``.
    Inputs are float32 in ``[0, 1]``, shape ``(n, 8, 8)``, and labels int32.
    """

    train_rows: np.ndarray
    train_x: np.ndarray
    train_y: np.ndarray
    heldout_x: np.ndarray
    heldout_y: np.ndarray
    production_x: np.ndarray
    production_y: np.ndarray


@dataclasses.dataclass(frozen=True)
class DemoArtifacts:
    """What build_demo planted and wrote.

    Attributes:
        target_index: the target's row in the production split.
        target_label: the target's true label.
        attacker_class: the class the poisoned model is meant to predict on the target.
        poison_ids: training ids of the poisons.
        clean_heldout_accuracy: held-out accuracy of the clean model, in [0, 1].
        poisoned_heldout_accuracy: held-out accuracy of the poisoned model, in [0, 1].
        target_confidence: the poisoned model's probability of ``attacker_class`` on the target.
        attack_succeeded: whether the poisoned model predicts ``attacker_class``
            on the target with probability at least ``CONFIDENCE_THRESHOLD``.
        params_path, data_path, meta_path: the files written.
    """

    target_index: int
    target_label: int
    attacker_class: int
    poison_ids: tuple[str, ...]
    clean_heldout_accuracy: float
    poisoned_heldout_accuracy: float
    target_confidence: float
    attack_succeeded: bool
    params_path: Path
    data_path: Path
    meta_path: Path


def split_digits(seed: int) -> DigitsSplit:
    """Load scikit-learn's digits and split them 60/20/20, stratified by label, with ``seed``."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    rows = np.arange(len(y))

    train_rows, rest_rows = _stratified_split(rows, y, 0.6, seed)
    heldout_rows, production_rows = _stratified_split(rest_rows, y, 0.5, seed + 1)
    return DigitsSplit(
        train_rows=train_rows,
        train_x=x[train_rows],
        train_y=y[train_rows],
        heldout_x=x[heldout_rows],
        heldout_y=y[heldout_rows],
        production_x=x[production_rows],
        production_y=y[production_rows],
    )


def _stratified_split(rows: np.ndarray, y: np.ndarray, fraction: float, seed: int):
    """Split ``rows`` into a shuffled first part with ``fraction`` of each class and the rest."""
    rng = np.random.default_rng(seed)
    first, rest = [], []
    for label in np.unique(y[rows]):
        members = rng.permutation(rows[y[rows] == label])
        cut = round(fraction * len(members))
        first.append(members[:cut])
        rest.append(members[cut:])
    return rng.permutation(np.concatenate(first)), rng.permutation(np.concatenate(rest))


def make_apply(module: DigitsMLP) -> Callable[[Any, jax.Array], jax.Array]:
    """Return ``apply(params, x) -> logits`` for ``module``, with ``params`` the ``"params"`` collection."""

    def apply(params: Any, x: jax.Array) -> jax.Array:
        return module.apply({"params": params}, x)

    return apply


def make_embed(module: DigitsMLP) -> Callable[[Any, jax.Array], jax.Array]:
    """Return ``embed(params, x) -> (B, hidden_size)`` penultimate features for ``module``."""

    def embed(params: Any, x: jax.Array) -> jax.Array:
        return module.apply({"params": params}, x, method=DigitsMLP.features)

    return embed


def init_params(module: DigitsMLP, init_seed: int) -> Any:
    """Initialise ``module``'s parameters from ``init_seed``."""
    dummy = jnp.zeros((1, *INPUT_SHAPE), jnp.float32)
    return module.init(jax.random.key(init_seed), dummy)["params"]


def train(
    x: np.ndarray,
    y: np.ndarray,
    *,
    steps: int = DEFAULT_STEPS,
    init_seed: int = 0,
    hidden_size: int = HIDDEN_SIZE,
    l2: float = L2,
    learning_rate: float = LEARNING_RATE,
) -> Any:
    """Train a :class:`DigitsMLP` from scratch with full-batch Adam and return its params.

    The objective is the mean softmax cross-entropy plus ``(l2 / 2) * ||params||^2``
    over all parameters, biases included. Training is deterministic: the same
    data and arguments give the same parameters, because the initialisation
    comes from ``init_seed`` and every step uses the whole batch.

    Args:
        x: inputs, shape ``(N, 8, 8)``, float32 in ``[0, 1]``.
        y: integer labels in ``[0, 10)``, shape ``(N,)``.
        steps: number of Adam steps, at least 1.
        init_seed: seed of the parameter initialisation.
        hidden_size: width of the hidden layer.
        l2: coefficient of the L2 term, at least 0.
        learning_rate: Adam's learning rate, greater than 0.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    module = DigitsMLP(hidden_size=hidden_size)
    params = init_params(module, init_seed)
    return _fit(
        module, params, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32), steps, l2, learning_rate
    )


@partial(jax.jit, static_argnums=(0, 4))
def _fit(module, params, x, y, steps, l2, learning_rate):
    apply = make_apply(module)
    optimizer = optax.adam(learning_rate)

    def objective(params):
        data_loss = optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y).mean()
        squared_norm = sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(params))
        return data_loss + 0.5 * l2 * squared_norm

    def step(carry, _):
        params, state = carry
        gradient = jax.grad(objective)(params)
        updates, state = optimizer.update(gradient, state, params)
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
    return params


def predict_proba(module: DigitsMLP, params: Any, x: np.ndarray) -> np.ndarray:
    """Return the class probabilities for ``x``, shape ``(B, num_classes)``."""
    return np.asarray(jax.nn.softmax(make_apply(module)(params, jnp.asarray(x))))


def accuracy(module: DigitsMLP, params: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Return the fraction of ``x`` that ``params`` classifies as ``y``."""
    return float(np.mean(predict_proba(module, params, x).argmax(axis=1) == y))
