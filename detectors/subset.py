"""Influence over a subset of the parameters, for models too large for the full Hessian.

:func:`restrict_to_subset` splits a parameter pytree into the leaves that
influence should use (for example the last layers) and the frozen rest, and
builds a loss over the subset alone. Every function of
:mod:`detectors.influence` then works on the subset unchanged. Influence over
a subset measures which training examples moved these parameters. It is
exact when only those parameters were trained (fine-tuning, transfer
learning) and an approximation otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

Params = Any
LossFn = Callable[[Params, Any, Any], jax.Array]


class ParameterSubset(NamedTuple):
    """A loss over some parameter leaves, the others held fixed.

    Attributes:
        loss: ``loss(subset_params, x, y) -> (B,)``. Build it once per model
            version: jitted influence functions cache their compilation per loss object.
        params: a dict from leaf path (``jax.tree_util.keystr``) to leaf, the kept leaves.
        merge: maps a subset pytree back to the full parameter pytree.
    """

    loss: LossFn
    params: dict[str, Any]
    merge: Callable[[dict[str, Any]], Params]


def leaf_paths(params: Params) -> list[str]:
    """Return the path of every leaf of ``params`` as ``jax.tree_util.keystr`` writes it, e.g. ``"['head']['kernel']"``."""
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def restrict_to_subset(loss: LossFn, params: Params, keep: Callable[[str], bool]) -> ParameterSubset:
    """Build the loss over the leaves whose path ``keep`` accepts.

    Args:
        loss: the full per-example loss ``loss(params, x, y) -> (B,)``.
        params: the full parameter pytree.
        keep: a predicate on leaf paths (see :func:`leaf_paths`).

    Returns:
        A :class:`ParameterSubset`.

    Raises:
        ValueError: if ``keep`` accepts no leaf.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [jax.tree_util.keystr(path) for path, _ in flat]
    leaves = [leaf for _, leaf in flat]
    kept = [path for path in paths if keep(path)]
    if not kept:
        raise ValueError(f"the parameter subset is empty: no leaf path matched, the paths are {paths}")

    def merge(subset: dict[str, Any]) -> Params:
        return jax.tree_util.tree_unflatten(treedef, [subset.get(path, leaf) for path, leaf in zip(paths, leaves)])

    def subset_loss(subset: dict[str, Any], x, y) -> jax.Array:
        return loss(merge(subset), x, y)

    return ParameterSubset(
        loss=subset_loss, params={path: leaf for path, leaf in zip(paths, leaves) if path in kept}, merge=merge
    )
