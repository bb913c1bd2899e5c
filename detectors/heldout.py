"""Held-out accuracy of a classifier, overall and per class."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class AccuracyReport(NamedTuple):
    """Accuracy on a labelled set.

    Attributes:
        accuracy: fraction of correct predictions, in [0, 1].
        per_class: ``(num_classes,)`` float64 accuracy among the examples of
            each true class; NaN for a class with no examples.
        num_examples: examples evaluated.
    """

    accuracy: float
    per_class: np.ndarray
    num_examples: int


@functools.cache
def _jitted_argmax(apply: Callable[[Any, jax.Array], jax.Array]) -> Callable[[Any, jax.Array], jax.Array]:
    # One compiled function per apply function, so repeated evaluations reuse it.
    return jax.jit(lambda params, batch: jnp.argmax(apply(params, batch), axis=-1))


def predict_classes(
    apply: Callable[[Any, jax.Array], jax.Array], params: Any, x: np.ndarray, *, batch_size: int = 512
) -> np.ndarray:
    """Return ``argmax`` of ``apply``'s logits for every row of ``x``, shape ``(N,)``.

    Rows go through in batches of one padded shape, so ``apply`` compiles once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    predict = _jitted_argmax(apply)
    n = len(x)
    out = np.empty(n, dtype=np.int64)
    for start in range(0, n, batch_size):
        batch = np.asarray(x[start : start + batch_size], dtype=np.float32)
        rows = len(batch)
        if rows < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - rows, *batch.shape[1:]), np.float32)])
        out[start : start + rows] = np.asarray(predict(params, batch))[:rows]
    return out


def accuracy_report(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> AccuracyReport:
    """Compare predicted classes ``(N,)`` with true labels ``(N,)``."""
    if predicted.shape != labels.shape:
        raise ValueError(f"predicted has shape {predicted.shape}, labels {labels.shape}; expected equal shapes")
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set is undefined: got 0 labels")
    correct = predicted == labels
    per_class = np.full(num_classes, np.nan)
    for cls in range(num_classes):
        mask = labels == cls
        if mask.any():
            per_class[cls] = correct[mask].mean()
    return AccuracyReport(accuracy=float(correct.mean()), per_class=per_class, num_examples=len(labels))
