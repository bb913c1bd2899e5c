"""Tests for monitor.flax_loader: linen and nnx modules, msgpack and Orbax checkpoints, inference mode."""

from __future__ import annotations

import sys
import types

import flax.linen as linen
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from monitor.errors import LoaderError
from monitor.flax_loader import CHECKPOINT_STATE, load

N = 12
FEATURES = 4


class LinenNet(linen.Module):
    @linen.compact
    def __call__(self, x, train: bool = False):
        x = linen.Dense(6)(x)
        x = linen.BatchNorm(use_running_average=not train)(x)
        x = linen.Dropout(0.5, deterministic=not train)(x)
        return linen.Dense(3)(jnp.tanh(x))

    def features(self, x):
        return x


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(FEATURES, 6, rngs=rngs)
        self.norm = nnx.BatchNorm(6, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.dropout(self.norm(self.dense(x)))))


@pytest.fixture(scope="module", autouse=True)
def factories():
    module = types.ModuleType("flax_loader_test_models")
    module.linen_net = LinenNet
    module.nnx_net = lambda: NnxNet(nnx.Rngs(0))
    sys.modules[module.__name__] = module
    yield
    del sys.modules[module.__name__]


@pytest.fixture
def data_dir(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "train_x": rng.normal(size=(N, FEATURES)).astype(np.float32),
        "train_y": rng.integers(0, 3, N).astype(np.int32),
        "train_ids": np.array([f"ex-{i}" for i in range(N)]),
        "train_sources": np.array(["a"] * N),
        "heldout_x": rng.normal(size=(5, FEATURES)).astype(np.float32),
        "heldout_y": rng.integers(0, 3, 5).astype(np.int32),
    }
    for name, value in arrays.items():
        np.save(tmp_path / f"{name}.npy", value)
    return tmp_path


def linen_variables():
    variables = LinenNet().init(jax.random.key(0), jnp.zeros((1, FEATURES)))
    # Non-trivial running statistics, so inference mode is visible in the output.
    stats = jax.tree.map(lambda leaf: leaf + 0.5, variables["batch_stats"])
    return {"params": variables["params"], "batch_stats": stats}


def test_linen_msgpack_inference_mode(tmp_path, data_dir):
    variables = linen_variables()
    checkpoint = tmp_path / "model.msgpack"
    checkpoint.write_bytes(flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, variables)))

    bundle = load({"module": "flax_loader_test_models:linen_net", "checkpoint": str(checkpoint),
                   "data": str(data_dir), "version": "v1", "l2": 0.01, "apply_kwargs": {"train": False}})
    x = jnp.asarray(np.load(data_dir / "train_x.npy"))
    expected = LinenNet().apply(variables, x, train=False)

    np.testing.assert_allclose(bundle.apply(bundle.params, x), expected, rtol=1e-6)
    np.testing.assert_allclose(bundle.apply(bundle.params, x), bundle.apply(bundle.params, x))
    assert bundle.num_classes == 3
    assert bundle.input_shape == (FEATURES,)
    assert bundle.l2 == 0.01
    assert isinstance(bundle.train.x, np.memmap)


def test_linen_orbax_checkpoint(tmp_path, data_dir):
    variables = linen_variables()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((tmp_path / "orbax").resolve(), variables)
    checkpointer.wait_until_finished()

    bundle = load({"module": "flax_loader_test_models:linen_net", "checkpoint": str(tmp_path / "orbax"),
                   "data": str(data_dir), "apply_kwargs": {"train": False}})
    x = jnp.asarray(np.load(data_dir / "heldout_x.npy"))

    np.testing.assert_allclose(bundle.apply(bundle.params, x), LinenNet().apply(variables, x), rtol=1e-6)


def test_nnx_msgpack_eval_mode(tmp_path, data_dir):
    model = NnxNet(nnx.Rngs(1))
    state = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, CHECKPOINT_STATE)))
    checkpoint = tmp_path / "nnx.msgpack"
    checkpoint.write_bytes(flax.serialization.msgpack_serialize(state))

    bundle = load({"module": "flax_loader_test_models:nnx_net", "checkpoint": str(checkpoint), "data": str(data_dir)})
    x = jnp.asarray(np.load(data_dir / "heldout_x.npy"))
    model.eval()

    np.testing.assert_allclose(bundle.apply(bundle.params, x), model(x), rtol=1e-6)
    np.testing.assert_allclose(bundle.apply(bundle.params, x), bundle.apply(bundle.params, x))
    assert bundle.num_classes == 3


def test_missing_option_raises(data_dir):
    with pytest.raises(LoaderError, match="option 'checkpoint' is missing"):
        load({"module": "flax_loader_test_models:linen_net", "data": str(data_dir)})


def test_missing_checkpoint_raises(tmp_path, data_dir):
    with pytest.raises(LoaderError, match="not found"):
        load({"module": "flax_loader_test_models:linen_net", "checkpoint": str(tmp_path / "none.msgpack"),
              "data": str(data_dir)})


def test_influence_params_option_selects_leaves(tmp_path, data_dir):
    checkpoint = tmp_path / "model.msgpack"
    checkpoint.write_bytes(flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, linen_variables())))
    options = {"module": "flax_loader_test_models:linen_net", "checkpoint": str(checkpoint), "data": str(data_dir),
               "apply_kwargs": {"train": False}}

    everything = load(options)
    kernels = load({**options, "influence_params": "kernel"})

    assert everything.influence_params is None
    assert kernels.influence_params("['params']['Dense_0']['kernel']")
    assert not kernels.influence_params("['params']['Dense_0']['bias']")


def test_invalid_influence_params_raises(tmp_path, data_dir):
    checkpoint = tmp_path / "model.msgpack"
    checkpoint.write_bytes(flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, linen_variables())))
    with pytest.raises(LoaderError, match="not a valid regular expression"):
        load({"module": "flax_loader_test_models:linen_net", "checkpoint": str(checkpoint), "data": str(data_dir),
              "influence_params": "("})
