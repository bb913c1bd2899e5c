"""The model loader contract: how the daemon gets a runnable model.

The daemon never guesses how to run a user's model. A config entry names a
loader as an import path ``package.module:function``; the function is called
with the entry's ``options`` table and returns a :class:`ModelBundle`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax

from monitor.errors import LoaderError

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]
LossFn = Callable[[Params, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class TrainingSet:
    """The training examples of one model version, aligned by row.

    Attributes:
        ids: stable example ids, shape ``(N,)``, strings unique within the set.
        x: inputs, shape ``(N, *input_shape)``, float32. May be a ``np.memmap``.
        y: integer labels, shape ``(N,)``.
        sources: where each example came from (a vendor, an upload batch),
            shape ``(N,)``, strings.
    """

    ids: np.ndarray
    x: np.ndarray
    y: np.ndarray
    sources: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.ids)
        for name in ("x", "y", "sources"):
            if len(getattr(self, name)) != n:
                raise LoaderError(
                    f"training set field {name!r} has {len(getattr(self, name))} rows, expected {n} like 'ids'"
                )
        if len(set(self.ids.tolist())) != n:
            raise LoaderError("training set ids are not unique")


@dataclasses.dataclass(frozen=True)
class HeldOutSet:
    """Labelled examples never used for training: ``x`` ``(M, *input_shape)``, ``y`` ``(M,)``."""

    x: np.ndarray
    y: np.ndarray


def softmax_cross_entropy_loss(apply: ApplyFn) -> LossFn:
    """Build the default per-example loss: softmax cross-entropy of ``apply``'s logits."""

    def loss(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
        logits = apply(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    return loss


@dataclasses.dataclass(frozen=True)
class ModelBundle:
    """Everything the daemon needs to run, evaluate and explain one model version.

    Attributes:
        version: the model version this bundle holds, as producers report it.
        apply: ``apply(params, x) -> logits``; batched, pure and jittable.
            ``x`` has shape ``(B, *input_shape)``, logits ``(B, num_classes)``.
        params: the parameter pytree.
        input_shape: shape of one input, without the batch axis.
        num_classes: number of output classes.
        train: the training set with stable ids.
        heldout: the held-out evaluation set.
        loss: ``loss(params, x, y) -> (B,)`` per-example training loss;
            defaults to softmax cross-entropy of ``apply``.
        l2: coefficient of the training objective's ``(l2 / 2) * ||params||^2`` term.
        embed: optional ``embed(params, x) -> (B, D)`` penultimate features.
        influence_params: optional predicate on parameter leaf paths (as
            ``jax.tree_util.keystr`` writes them, e.g. ``"['params']['head']['kernel']"``);
            influence then uses only the accepted leaves, the others held fixed.
            For large models, where the full Hessian is too costly.
    """

    version: str
    apply: ApplyFn
    params: Params
    input_shape: tuple[int, ...]
    num_classes: int
    train: TrainingSet
    heldout: HeldOutSet
    loss: LossFn | None = None
    l2: float = 0.0
    embed: ApplyFn | None = None
    influence_params: Callable[[str], bool] | None = None

    @property
    def loss_fn(self) -> LossFn:
        """The per-example loss, the default one when the loader gave none."""
        return self.loss if self.loss is not None else softmax_cross_entropy_loss(self.apply)


def resolve_loader(path: str) -> Callable[[Mapping[str, Any]], ModelBundle]:
    """Import the loader function named by ``package.module:function``."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise LoaderError(f"invalid loader path {path!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise LoaderError(f"loader module {module_name!r} could not be imported: {error}") from error
    try:
        loader = getattr(module, attribute)
    except AttributeError:
        raise LoaderError(f"loader module {module_name!r} has no attribute {attribute!r}") from None
    if not callable(loader):
        raise LoaderError(f"loader {path!r} is not callable")
    return loader


def load_bundle(path: str, options: Mapping[str, Any]) -> ModelBundle:
    """Call the loader named by ``path`` with ``options`` and check what it returns."""
    bundle = resolve_loader(path)(options)
    if not isinstance(bundle, ModelBundle):
        raise LoaderError(f"loader {path!r} returned {type(bundle).__name__}, expected ModelBundle")
    if bundle.train.x.shape[1:] != tuple(bundle.input_shape):
        raise LoaderError(
            f"loader {path!r}: training inputs have shape {bundle.train.x.shape[1:]}, "
            f"expected input_shape {tuple(bundle.input_shape)}"
        )
    return bundle
