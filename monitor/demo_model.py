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
import io
import json
import os
import zipfile
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

from detectors.attacks import AttackOutcome, plant_dirty_label_attack
from monitor.errors import LoaderError, PoisonwatchError
from monitor.loader import HeldOutSet, ModelBundle, TrainingSet

# Version of the files that build_demo writes, checked by load.
DEMO_FORMAT_VERSION = 1

INPUT_SHAPE = (8, 8)
NUM_CLASSES = 10
HIDDEN_SIZE = 64
# A weak L2 term, because a smoother model resists the attack: with 2,000
# steps, 8 poisons flipped 4 of 10 seed-0 targets to probability 0.9 at
# l2 = 1e-3, and 10 of 10 at 1e-4.
L2 = 1e-4
LEARNING_RATE = 1e-2
DEFAULT_STEPS = 2000
DEFAULT_NUM_POISONS = 8
# Less than one grey level of the digits (1/16), so the poisons are near-copies.
DEFAULT_EPSILON = 0.05
CRAFT_STEPS = 10
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
    """The attack that build_demo planted, its measured effect, and the files written.

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
    over all parameters, biases included. The initialisation comes from
    ``init_seed`` and every step uses the whole batch, so the same data and
    arguments give the same parameters.

    NOTE: bit-identical results were checked on CPU only. On a GPU, XLA's
    reductions may differ between runs.

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


def select_targets(
    module: DigitsMLP, params: Any, production_x: np.ndarray, production_y: np.ndarray, limit: int
) -> list[tuple[int, int]]:
    """Pick up to ``limit`` targets for the attack, as ``(production index, attacker class)`` pairs.

    A target is a production example that the clean model classifies correctly
    with probability at least ``CONFIDENCE_THRESHOLD``, so that a flip is a
    high-confidence change of mind. Its attacker class is the clean model's
    runner-up class, the easiest class to move it to. Targets come in
    production order, which the split's seed shuffled.
    """
    probabilities = predict_proba(module, params, production_x)
    predictions = probabilities.argmax(axis=1)
    targets = []
    for index in range(len(production_y)):
        if predictions[index] != production_y[index]:
            continue
        if probabilities[index, predictions[index]] < CONFIDENCE_THRESHOLD:
            continue
        runner_up = int(np.argsort(probabilities[index])[-2])
        targets.append((index, runner_up))
        if len(targets) == limit:
            break
    return targets


def build_demo(
    workdir: Path,
    *,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    num_poisons: int = DEFAULT_NUM_POISONS,
    progress: Callable[[str], None] | None = None,
) -> DemoArtifacts:
    """Train the clean model, plant a targeted attack, retrain, and write the poisoned version.

    ``seed`` fixes the data split, the parameter initialisation (shared by the
    clean and the poisoned training run) and the poisons, so the same
    arguments give the same files. Up to ``MAX_TARGET_CANDIDATES`` targets are
    tried in turn until one attack succeeds. When none does, the attempt that
    came closest is written and ``attack_succeeded`` is False.

    ``workdir`` gets ``params.msgpack`` (the poisoned model's parameters),
    ``data.npz`` (the poisoned training set, the held-out and the production
    split) and ``meta.json``. Existing files are replaced. :func:`load` reads
    them back.

    Args:
        workdir: the directory to write into. It is created if missing.
        seed: the seed of the split, the initialisation and the attack.
        steps: Adam steps of each training run.
        num_poisons: number of poisons planted.
        progress: called with a one-line message before each slow stage.

    Raises:
        PoisonwatchError: the clean model classifies no production example
            correctly with probability at least ``CONFIDENCE_THRESHOLD``, so no
            target exists. More ``steps`` fix this.
    """
    report = progress if progress is not None else (lambda message: None)
    workdir = Path(workdir)
    split = split_digits(seed)
    module = DigitsMLP()
    apply = make_apply(module)

    def train_fn(x: np.ndarray, y: np.ndarray) -> Any:
        return train(x, y, steps=steps, init_seed=seed)

    report(f"training the clean model on {len(split.train_y)} digits ({steps} steps)")
    clean_params = train_fn(split.train_x, split.train_y)
    clean_accuracy = accuracy(module, clean_params, split.heldout_x, split.heldout_y)

    targets = select_targets(
        module, clean_params, split.production_x, split.production_y, MAX_TARGET_CANDIDATES
    )
    if not targets:
        raise PoisonwatchError(
            f"the clean model trained for {steps} steps classifies no production example correctly "
            f"with probability >= {CONFIDENCE_THRESHOLD}, so there is no target to attack. "
            "Increase steps."
        )

    target_index, attacker_class, outcome = _attack_first_feasible_target(
        split, clean_params, targets, apply, train_fn, num_poisons, seed, report
    )
    poisoned_accuracy = accuracy(module, outcome.params, split.heldout_x, split.heldout_y)
    train_ids, train_sources, poison_ids = _label_training_rows(split, outcome, num_poisons)
    artifacts = DemoArtifacts(
        target_index=int(target_index),
        target_label=int(split.production_y[target_index]),
        attacker_class=int(attacker_class),
        poison_ids=poison_ids,
        clean_heldout_accuracy=clean_accuracy,
        poisoned_heldout_accuracy=poisoned_accuracy,
        target_confidence=outcome.target_confidence,
        attack_succeeded=outcome.succeeded,
        params_path=workdir / PARAMS_FILE,
        data_path=workdir / DATA_FILE,
        meta_path=workdir / META_FILE,
    )

    report(f"writing the poisoned model version to {workdir}")
    workdir.mkdir(parents=True, exist_ok=True)
    _write_atomically(artifacts.params_path, flax.serialization.to_bytes(outcome.params))
    _write_atomically(
        artifacts.data_path, _encode_data(split, outcome, train_ids, train_sources)
    )
    # meta.json goes last, so a directory that contains it contains a complete demo.
    meta = _build_meta(seed, steps, num_poisons, split, outcome, artifacts)
    _write_atomically(artifacts.meta_path, json.dumps(meta, indent=2).encode())
    return artifacts


def _attack_first_feasible_target(
    split: DigitsSplit,
    clean_params: Any,
    targets: list[tuple[int, int]],
    apply: Callable[[Any, jax.Array], jax.Array],
    train_fn: Callable[[np.ndarray, np.ndarray], Any],
    num_poisons: int,
    seed: int,
    report: Callable[[str], None],
) -> tuple[int, int, AttackOutcome]:
    """Attack ``targets`` in turn until one attack succeeds.

    Returns the successful attack's target index, attacker class and outcome,
    or those of the attempt with the highest target confidence when none succeeds.
    """
    attack_key = jax.random.key(seed)
    best = None
    for attempt, (target_index, attacker_class) in enumerate(targets):
        report(
            f"planting {num_poisons} poisons for production example {target_index} "
            f"(label {split.production_y[target_index]}, attacker class {attacker_class}) and retraining"
        )
        outcome = plant_dirty_label_attack(
            train_fn,
            apply,
            clean_params,
            split.train_x,
            split.train_y,
            split.production_x[target_index],
            attacker_class,
            num_poisons=num_poisons,
            epsilon=DEFAULT_EPSILON,
            key=jax.random.fold_in(attack_key, attempt),
            confidence_threshold=CONFIDENCE_THRESHOLD,
            steps=CRAFT_STEPS,
        )
        if best is None or outcome.target_confidence > best[2].target_confidence:
            best = (target_index, attacker_class, outcome)
        if outcome.succeeded:
            break
        report(
            f"the attack on production example {target_index} reached only "
            f"{outcome.target_confidence:.3f} for class {attacker_class}"
        )

    return best


def _label_training_rows(
    split: DigitsSplit, outcome: AttackOutcome, num_poisons: int
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Return the ids and sources of the poisoned training set's rows, and the poisons' ids."""
    total = len(outcome.poisoned_y)
    is_poison = np.zeros(total, dtype=bool)
    is_poison[outcome.poison_indices] = True
    poison_ids = tuple(f"upload-{POISON_UPLOAD:04d}-{number:03d}" for number in range(num_poisons))

    ids = np.empty(total, dtype=object)
    ids[~is_poison] = [f"digits-train-{row:05d}" for row in split.train_rows]
    ids[is_poison] = poison_ids
    sources = np.where(is_poison, POISON_SOURCE, CLEAN_SOURCE)
    # Unicode arrays, not object arrays, so that np.load needs no allow_pickle.
    return ids.astype(str), sources.astype(str), poison_ids


def _encode_data(
    split: DigitsSplit, outcome: AttackOutcome, train_ids: np.ndarray, train_sources: np.ndarray
) -> bytes:
    buffer = io.BytesIO()
    np.savez(
        buffer,
        train_ids=train_ids,
        train_x=outcome.poisoned_x.astype(np.float32),
        train_y=outcome.poisoned_y.astype(np.int32),
        train_sources=train_sources,
        heldout_x=split.heldout_x,
        heldout_y=split.heldout_y,
        production_x=split.production_x,
        production_y=split.production_y,
    )
    return buffer.getvalue()


def _build_meta(
    seed: int,
    steps: int,
    num_poisons: int,
    split: DigitsSplit,
    outcome: AttackOutcome,
    artifacts: DemoArtifacts,
) -> dict[str, Any]:
    return {
        "format_version": DEMO_FORMAT_VERSION,
        "version": f"digits-mlp-seed{seed}",
        "architecture": {
            "module": "DigitsMLP",
            "input_shape": list(INPUT_SHAPE),
            "hidden_size": HIDDEN_SIZE,
            "activation": "tanh",
            "num_classes": NUM_CLASSES,
        },
        "training": {
            "objective": "mean softmax cross-entropy + (l2 / 2) * ||params||^2",
            "optimizer": "adam",
            "learning_rate": LEARNING_RATE,
            "steps": steps,
            "l2": L2,
            "init_seed": seed,
        },
        "split": {
            "seed": seed,
            "train": len(split.train_y),
            "heldout": len(split.heldout_y),
            "production": len(split.production_y),
        },
        "attack": {
            "kind": "dirty-label near-copies",
            "target_production_index": artifacts.target_index,
            "target_label": artifacts.target_label,
            "attacker_class": artifacts.attacker_class,
            "epsilon": DEFAULT_EPSILON,
            "craft_steps": CRAFT_STEPS,
            "num_poisons": num_poisons,
            "poison_ids": list(artifacts.poison_ids),
            "poison_source": POISON_SOURCE,
            "succeeded": artifacts.attack_succeeded,
            "target_prediction": outcome.target_prediction,
            "target_confidence": artifacts.target_confidence,
            "confidence_threshold": CONFIDENCE_THRESHOLD,
        },
        "heldout_accuracy": {
            "clean": artifacts.clean_heldout_accuracy,
            "poisoned": artifacts.poisoned_heldout_accuracy,
        },
    }


def _write_atomically(path: Path, content: bytes) -> None:
    """Write ``content`` to a temporary file beside ``path``, then rename it over ``path``."""
    # A plain open, unlike tempfile.mkstemp, creates the file with the umask's
    # permissions rather than 0600.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            file.write(content)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def load(options: Mapping[str, Any]) -> ModelBundle:
    """Load the demo's poisoned model version from the directory that build_demo wrote.

    ``options["path"]`` is that directory. The loss is the default softmax
    cross-entropy, and ``embed`` returns the hidden layer's activations.

    Raises:
        LoaderError: the option is missing, a file is missing or unreadable,
            or the files do not match this version of the demo.
    """
    if "path" not in options:
        raise LoaderError(
            "demo loader option 'path' is missing: set it to the directory that 'poisonwatch demo' wrote"
        )
    workdir = Path(options["path"])
    missing = [name for name in (PARAMS_FILE, DATA_FILE, META_FILE) if not (workdir / name).is_file()]
    if missing:
        raise LoaderError(
            f"demo directory {str(workdir)!r} is missing {', '.join(missing)}: run 'poisonwatch demo' to build it"
        )

    meta = _read_meta(workdir / META_FILE)
    architecture = meta["architecture"]
    module = DigitsMLP(hidden_size=architecture["hidden_size"], num_classes=architecture["num_classes"])
    params = _read_params(workdir / PARAMS_FILE, module)
    data = _read_data(workdir / DATA_FILE)
    return ModelBundle(
        version=meta["version"],
        apply=make_apply(module),
        params=params,
        input_shape=tuple(architecture["input_shape"]),
        num_classes=architecture["num_classes"],
        train=TrainingSet(
            ids=data["train_ids"], x=data["train_x"], y=data["train_y"], sources=data["train_sources"]
        ),
        heldout=HeldOutSet(x=data["heldout_x"], y=data["heldout_y"]),
        l2=float(meta["training"]["l2"]),
        embed=make_embed(module),
    )


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise LoaderError(f"could not read demo metadata {str(path)!r}: {error}") from error
    found = meta.get("format_version") if isinstance(meta, dict) else None
    if found != DEMO_FORMAT_VERSION:
        raise LoaderError(
            f"demo metadata {str(path)!r} has format version {found!r}, expected {DEMO_FORMAT_VERSION}: "
            "rebuild it with 'poisonwatch demo'"
        )
    missing = [key for key in ("version", "architecture", "training") if key not in meta]
    if missing:
        raise LoaderError(
            f"demo metadata {str(path)!r} is missing {', '.join(missing)}: rebuild it with 'poisonwatch demo'"
        )
    return meta


def _read_params(path: Path, module: DigitsMLP) -> Any:
    template = init_params(module, 0)
    try:
        params = flax.serialization.from_bytes(template, path.read_bytes())
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise LoaderError(f"could not read demo parameters {str(path)!r}: {error}") from error
    expected = jax.tree.map(np.shape, template)
    found = jax.tree.map(np.shape, params)
    if found != expected:
        raise LoaderError(
            f"demo parameters {str(path)!r} have shapes {found}, expected {expected} from meta.json's architecture"
        )
    return params


def _read_data(path: Path) -> dict[str, np.ndarray]:
    keys = (
        "train_ids", "train_x", "train_y", "train_sources", "heldout_x", "heldout_y",
    )
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in keys if key not in archive.files]
            if missing:
                raise LoaderError(f"demo data {str(path)!r} is missing arrays {', '.join(missing)}")
            return {key: archive[key] for key in keys}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise LoaderError(f"could not read demo data {str(path)!r}: {error}") from error
