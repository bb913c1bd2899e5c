"""Predicted versus actual leave-one-out effects on scikit-learn's digits.

For each model, trains to tight convergence in float64, picks the held-out
example with the highest loss as the incident, scores the training set with
influence (float32, the daemon's path), and retrains without each of the 40
most influential (largest |score|) and 20 random other training examples,
warm-started, in float64. Prints Pearson correlation and the slope of actual
on predicted effect, for first-order influence and for the Newton-step
correction of :mod:`detectors.newton`.

    .venv/bin/python benchmarks/fidelity.py            # about 3 minutes on 2 cores
    .venv/bin/python benchmarks/fidelity.py --quick    # fewer examples, smaller training set

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import _common
from detectors.fidelity import fidelity_figures, make_newton_trainer, retrain_without
from detectors.influence import compute_influence
from detectors.newton import newton_loo_effects

GOALS = {"logistic-l2=0.01": 0.99, "logistic-l2=0.001": 0.98}
SLOPE_RANGE = (0.8, 1.25)


def run_case(name, apply, params, x, y, test_x, test_y, *, l2, damping, top, random, seed):
    loss = _common.cross_entropy(apply)
    train = make_newton_trainer(loss, params, x, y, l2=l2)
    started = time.perf_counter()
    optimum, gradient_norm = train(np.ones(len(x)), params)
    with jax.enable_x64(True):
        test_losses = np.asarray(loss(optimum, jnp.asarray(test_x, jnp.float64), jnp.asarray(test_y)))
    incident = int(np.argmax(test_losses))
    params32 = jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float32), optimum)

    report = compute_influence(
        loss, params32, x, y, test_x[incident], test_y[incident], l2=l2, damping=damping, tol=1e-5, maxiter=2000
    )
    order = np.argsort(-np.abs(report.scores))
    chosen_top = order[:top]
    rest = order[top:]
    chosen_random = np.random.default_rng(seed).choice(rest, size=random, replace=False)
    rows = np.concatenate([chosen_top, chosen_random])

    newton = newton_loo_effects(
        loss, params32, x, y, test_x[incident], test_y[incident], rows, l2=l2, damping=report.damping, tol=1e-5,
        maxiter=2000,
    )
    retrained = retrain_without(train, len(x), rows, optimum)
    with jax.enable_x64(True):
        test_x64 = jnp.asarray(test_x[incident : incident + 1], jnp.float64)
        test_y64 = jnp.asarray(test_y[incident : incident + 1])
        base = float(loss(optimum, test_x64, test_y64)[0])
        actual = np.array([float(loss(p, test_x64, test_y64)[0]) - base for p, _ in retrained])
    worst_gradient = max(norm for _, norm in retrained)

    first = fidelity_figures(report.scores[rows], actual)
    refined = fidelity_figures(newton.effects, actual)
    return {
        "model": name,
        "l2": l2,
        "damping": report.damping,
        "n_train": len(x),
        "incident_loss": float(test_losses[incident]),
        "cg_iterations": report.iterations,
        "cg_residual": report.residual,
        "cg_converged": report.converged,
        "retrain_max_gradient_norm": max(worst_gradient, gradient_norm),
        "newton_all_converged": bool(newton.converged.all()),
        "first_order": first._asdict(),
        "newton": refined._asdict(),
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="use 300 training examples and 10 + 5 removals")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the random removals")
    args = parser.parse_args()

    train_x, train_y, test_x, test_y = _common.digits(args.seed)
    top, random = (10, 5) if args.quick else (40, 20)
    if args.quick:
        train_x, train_y = train_x[:300], train_y[:300]

    cases = []
    for l2 in (0.01, 0.001):
        start = _common.init_linear(64)
        cases.append(run_case(f"logistic-l2={l2}", _common.linear_apply, start, train_x, train_y, test_x, test_y,
                              l2=l2, damping=0.0, top=top, random=random, seed=args.seed))
    mlp_start = _common.train_adam(_common.mlp_apply, _common.init_mlp(64, 16, args.seed), train_x, train_y,
                                   l2=0.01, steps=3000)
    cases.append(run_case("mlp16-l2=0.01", _common.mlp_apply, mlp_start, train_x, train_y, test_x, test_y,
                          l2=0.01, damping=None, top=top, random=random, seed=args.seed))

    print(f"{'model':<20} {'damping':>8} {'1st r':>7} {'1st slope':>9} {'newton r':>9} {'newton slope':>12} {'goal r':>7}")
    for case in cases:
        goal = GOALS.get(case["model"], float("nan"))
        print(
            f"{case['model']:<20} {case['damping']:>8.2g} {case['first_order']['pearson']:>7.4f} "
            f"{case['first_order']['slope']:>9.3f} {case['newton']['pearson']:>9.4f} "
            f"{case['newton']['slope']:>12.3f} {goal:>7}"
        )
    for case in cases:
        if case["model"] in GOALS:
            case["goal_met"] = bool(
                case["newton"]["pearson"] >= GOALS[case["model"]]
                and SLOPE_RANGE[0] <= case["newton"]["slope"] <= SLOPE_RANGE[1]
            )
    _common.print_json({"benchmark": "fidelity", "quick": args.quick, "machine": _common.machine(), "cases": cases})


if __name__ == "__main__":
    main()
