"""Process-wide JAX settings: the persistent compilation cache and a description of the backend."""

from __future__ import annotations

import os
from pathlib import Path

import jax


def enable_compilation_cache(path: str | os.PathLike, *, min_compile_seconds: float = 0.0) -> Path:
    """Make JAX store compiled programs under ``path``, so a restarted process does not recompile them.

    Call it once at start-up, before the first ``jax.jit`` call compiles.
    Entries are keyed by the program, the JAX version and the device, so a
    cache shared by different machines or versions only misses, never errs.

    Args:
        path: a directory, created if missing.
        min_compile_seconds: programs that compiled faster than this are not
            stored. 0 stores every program.

    Returns:
        The cache directory.
    """
    directory = Path(path).expanduser().resolve()
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def describe_backend() -> dict[str, object]:
    """Return the JAX backend, version and local devices, for metrics and start-up logs."""
    devices = jax.local_devices()
    return {
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "device_count": len(devices),
        "process_count": jax.process_count(),
        "devices": [f"{device.platform}:{device.id} {device.device_kind}" for device in devices],
    }
