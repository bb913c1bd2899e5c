"""A generic loader for Flax models: linen or nnx modules, Orbax or msgpack checkpoints, ``.npy`` data.

A config entry names it as ``monitor.flax_loader:load`` with options:

- ``module``: ``package.module:factory``, a callable with no arguments that
  returns a ``flax.linen.Module`` or a ``flax.nnx.Module`` (nnx modules are
  built with their own ``nnx.Rngs``; the checkpoint then overwrites the state).
- ``checkpoint``: an Orbax checkpoint directory (``StandardCheckpointer``) or a
  Flax msgpack file (``flax.serialization.msgpack_serialize``). For linen it
  holds the variables dict (``{"params": ..., "batch_stats": ...}``); for nnx,
  ``nnx.to_pure_dict(nnx.state(model, CHECKPOINT_STATE))``. Pickle is never read.
- ``data``: a directory with ``train_x.npy``, ``train_y.npy``,
  ``train_ids.npy``, ``train_sources.npy``, ``heldout_x.npy`` and
  ``heldout_y.npy``. The inputs are opened memory-mapped, so the training set
  is streamed in batches and need not fit in memory.
- ``version`` (string), ``l2`` (float, default 0), ``embed_method`` (linen:
  the name of a module method returning penultimate features), and
  ``apply_kwargs`` (linen: keyword arguments for inference mode, e.g.
  ``{train = false}``).
- ``influence_params`` (optional): a regular expression searched in each
  parameter leaf path (``jax.tree_util.keystr``, e.g. ``"['params']['head']"``);
  influence then uses only the matching leaves, for large models.

Inference mode: for linen, ``apply`` passes ``apply_kwargs`` and no PRNG keys
and no mutable collections, so a Dropout that is not deterministic raises
instead of silently dropping units, and BatchNorm must use its running
averages. For nnx the loader calls ``model.eval()``, which switches Dropout
and BatchNorm to inference.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as linen
import flax.serialization
import jax
import numpy as np
from flax import nnx

from monitor.errors import LoaderError
from monitor.loader import HeldOutSet, ModelBundle, TrainingSet

# The nnx state a checkpoint holds: parameters and BatchNorm statistics, not PRNG state.
CHECKPOINT_STATE = nnx.Any(nnx.Param, nnx.BatchStat)

DATA_FILES = ("train_x", "train_y", "train_ids", "train_sources", "heldout_x", "heldout_y")


def load(options: Mapping[str, Any]) -> ModelBundle:
    """Load a Flax model version described by ``options`` (see the module docstring).

    Raises:
        LoaderError: an option is missing or invalid, or a file is missing or unreadable.
    """
    for name in ("module", "checkpoint", "data"):
        if name not in options:
            raise LoaderError(f"flax loader option {name!r} is missing")
    model = _build_module(str(options["module"]))
    state = read_checkpoint(Path(options["checkpoint"]))
    data = read_data(Path(options["data"]))
    if isinstance(model, linen.Module):
        apply, params, embed = linen_functions(model, state, options.get("embed_method"), options.get("apply_kwargs", {}))
    elif isinstance(model, nnx.Module):
        apply, params, embed = nnx_functions(model, state)
    else:
        raise LoaderError(
            f"module factory {options['module']!r} returned {type(model).__name__}, expected a flax linen or nnx Module"
        )

    input_shape = tuple(data["train_x"].shape[1:])
    logits = jax.eval_shape(apply, params, jax.ShapeDtypeStruct((1, *input_shape), data["train_x"].dtype))
    return ModelBundle(
        version=str(options.get("version", Path(options["checkpoint"]).name)),
        apply=apply,
        params=params,
        input_shape=input_shape,
        num_classes=int(logits.shape[-1]),
        train=TrainingSet(
            ids=data["train_ids"], x=data["train_x"], y=data["train_y"], sources=data["train_sources"]
        ),
        heldout=HeldOutSet(x=data["heldout_x"], y=data["heldout_y"]),
        l2=float(options.get("l2", 0.0)),
        embed=embed,
        influence_params=_leaf_filter(options.get("influence_params")),
    )


def _leaf_filter(pattern: object) -> Callable[[str], bool] | None:
    """Turn the ``influence_params`` option, a regular expression searched in leaf paths, into a predicate."""
    if pattern is None:
        return None
    if not isinstance(pattern, str) or not pattern:
        raise LoaderError(f"flax loader option 'influence_params' must be a non-empty regular expression, got {pattern!r}")
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise LoaderError(f"flax loader option 'influence_params' {pattern!r} is not a valid regular expression: {error}") from None
    return lambda path: compiled.search(path) is not None


def _build_module(path: str) -> Any:
    module_name, sep, attribute = path.partition(":")
    if not sep:
        raise LoaderError(f"invalid module {path!r}: expected 'package.module:factory'")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise LoaderError(f"module factory {path!r} could not be imported: {error}") from error
    return factory()


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Read a nested dict of arrays from an Orbax checkpoint directory or a Flax msgpack file."""
    if path.is_dir():
        import orbax.checkpoint as ocp

        try:
            return ocp.StandardCheckpointer().restore(path.resolve())
        except (OSError, ValueError, FileNotFoundError) as error:
            raise LoaderError(f"could not restore Orbax checkpoint {str(path)!r}: {error}") from error
    if not path.is_file():
        raise LoaderError(f"checkpoint {str(path)!r} not found: expected an Orbax directory or a msgpack file")
    try:
        return flax.serialization.msgpack_restore(path.read_bytes())
    except Exception as error:  # msgpack raises several unrelated exception types
        raise LoaderError(f"could not read msgpack checkpoint {str(path)!r}: {error}") from error


def read_data(folder: Path) -> dict[str, np.ndarray]:
    """Open the data files of the module docstring; inputs and labels memory-mapped."""
    data = {}
    for name in DATA_FILES:
        path = folder / f"{name}.npy"
        if not path.is_file():
            raise LoaderError(f"data file {str(path)!r} not found")
        mmap = "r" if name.endswith(("_x", "_y")) else None
        try:
            data[name] = np.load(path, mmap_mode=mmap, allow_pickle=False)
        except ValueError as error:
            raise LoaderError(f"could not read {str(path)!r} without pickle: {error}") from error
    return data


def linen_functions(module: linen.Module, variables: dict[str, Any], embed_method: str | None, apply_kwargs):
    """Return ``(apply, params, embed)`` for a linen module; collections other than params stay fixed."""
    if "params" not in variables:
        raise LoaderError(f"linen checkpoint has collections {sorted(variables)}, expected a 'params' collection")
    fixed = {name: value for name, value in variables.items() if name != "params"}
    kwargs = dict(apply_kwargs)

    def apply(params, x):
        return module.apply({"params": params, **fixed}, x, **kwargs)

    embed = None
    if embed_method:
        method = getattr(type(module), embed_method, None)
        if method is None:
            raise LoaderError(f"linen module {type(module).__name__} has no method {embed_method!r}")

        def embed(params, x):
            return module.apply({"params": params, **fixed}, x, method=method)

    return apply, jax.tree.map(jax.numpy.asarray, variables["params"]), embed


def nnx_functions(model: nnx.Module, pure_state: dict[str, Any]):
    """Return ``(apply, params, None)`` for an nnx module in inference mode; non-parameter state stays fixed."""
    state = nnx.state(model, CHECKPOINT_STATE)
    try:
        nnx.replace_by_pure_dict(state, pure_state)
    except (KeyError, ValueError, TypeError) as error:
        raise LoaderError(f"nnx checkpoint does not match the module's state: {error}") from error
    nnx.update(model, state)
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def apply(params, x):
        return nnx.merge(graphdef, params, rest)(x)

    return apply, params, None
