"""A tiny linear softmax classifier on separable blobs, as a loader the daemon can name.

Training takes a fraction of a second, so tests can run the whole daemon on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from monitor.loader import HeldOutSet, ModelBundle, TrainingSet

INPUT_SHAPE = (2, 2)
NUM_CLASSES = 3
L2 = 1e-2


def apply(params: Any, x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]


def make_data(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_CLASSES, n)
    centers = np.eye(NUM_CLASSES, 4) * 3.0
    x = centers[y] + rng.normal(size=(n, 4))
    return x.reshape(n, *INPUT_SHAPE).astype(np.float32), y.astype(np.int32)


def train(x: np.ndarray, y: np.ndarray, steps: int = 300) -> dict[str, jax.Array]:
    params = {"w": jnp.zeros((4, NUM_CLASSES)), "b": jnp.zeros(NUM_CLASSES)}
    optimizer = optax.adam(0.1)

    def objective(p):
        losses = optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y)
        return losses.mean() + 0.5 * L2 * sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(p))

    @jax.jit
    def run(p):
        def step(carry, _):
            p, state = carry
            updates, state = optimizer.update(jax.grad(objective)(p), state)
            return (optax.apply_updates(p, updates), state), None

        (p, _), _ = jax.lax.scan(step, (p, optimizer.init(p)), None, length=steps)
        return p

    return run(params)


def load(options: Mapping[str, Any]) -> ModelBundle:
    """Loader for tests; ``options["n"]`` sets the training set size."""
    n = int(options.get("n", 60))
    x, y = make_data(0, n)
    heldout_x, heldout_y = make_data(1, 40)
    sources = np.array(["vendor-a" if i % 2 else "vendor-b" for i in range(n)])
    return ModelBundle(
        version=str(options.get("version", "1")),
        apply=apply,
        params=train(x, y),
        input_shape=INPUT_SHAPE,
        num_classes=NUM_CLASSES,
        train=TrainingSet(ids=np.array([f"toy-{i:03d}" for i in range(n)]), x=x, y=y, sources=sources),
        heldout=HeldOutSet(x=heldout_x, y=heldout_y),
        l2=L2,
        # With the "weights_only" option, influence ignores the bias, as a large model would skip layers.
        influence_params=(lambda path: "'w'" in path) if options.get("weights_only") else None,
    )
