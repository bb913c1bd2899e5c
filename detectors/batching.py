"""Fixed-shape batches of a training set, optionally split over all local devices.

A training set is read in batches of one padded shape, so every jitted
per-batch function compiles once, and the arrays may be ``np.memmap`` files
larger than memory: only one batch is copied into memory at a time.

With more than one local device, :func:`data_sharding` returns a sharding
that splits the batch axis over all of them. A batch placed with it runs data
parallel under ``jax.jit``: each device computes its rows, and sums over the
batch (the Hessian-vector product) become cross-device reductions inserted by
XLA. Parameters stay replicated.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Array = Any  # a jax.Array or a numpy array, np.memmap included

DATA_AXIS = "data"


def data_sharding(devices: list[jax.Device] | None = None) -> NamedSharding | None:
    """Return a sharding that splits axis 0 over ``devices``, or None for a single device.

    Args:
        devices: the devices to use. Defaults to ``jax.local_devices()``.
    """
    devices = jax.local_devices() if devices is None else list(devices)
    if len(devices) <= 1:
        return None
    mesh = Mesh(np.array(devices), (DATA_AXIS,))
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def fit_batch_size(batch_size: int, n: int, sharding: NamedSharding | None) -> int:
    """Return ``min(batch_size, n)`` rounded up to a multiple of the sharding's device count."""
    batch_size = min(batch_size, n)
    if sharding is None:
        return batch_size
    devices = sharding.mesh.size
    return -(-batch_size // devices) * devices


def padded_batches(
    x: Array, y: Array, batch_size: int, sharding: NamedSharding | None = None
) -> Iterator[tuple[Any, Any, Any]]:
    """Yield ``(x_batch, y_batch, mask)`` with leading axis ``batch_size``.

    The last batch is padded with copies of its final real row rather than
    zeros, so the padding's losses and derivatives stay finite. ``mask`` is a
    bool ``(batch_size,)`` array that is True for real rows. With a sharding,
    the three arrays are placed on its devices, split along axis 0, and
    ``batch_size`` must be a multiple of the device count
    (see :func:`fit_batch_size`).
    """
    n = len(x)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        x_batch = np.asarray(x[start:stop])
        y_batch = np.asarray(y[start:stop])
        padding = batch_size - (stop - start)
        if padding:
            x_batch = np.concatenate([x_batch, np.repeat(x_batch[-1:], padding, axis=0)])
            y_batch = np.concatenate([y_batch, np.repeat(y_batch[-1:], padding, axis=0)])
        mask = np.arange(batch_size) < stop - start
        if sharding is not None:
            x_batch, y_batch, mask = jax.device_put((x_batch, y_batch, mask), sharding)
        yield x_batch, y_batch, mask
