"""The cost of one incident's influence analysis, measured side by side in one run.

Model: a 64-unit tanh MLP (4,810 parameters) on scikit-learn's digits,
trained with L2 = 1e-4; the training set (1,078 examples) is read from
``np.memmap`` files in batches of 512. Prints:

- the scoring pass over all training examples as a multiple of one jitted
  forward pass over the same set (goal <= 3x);
- the whole per-incident cost with conjugate gradient, and with per-version
  factors (rank 256), with and without the explicit residual check;
- the factors' one-off cost per model version;
- the seed-style approach (one ``jax.grad`` per training example in a Python
  loop, then a dot product with the CG solution), timed on 100 examples and
  scaled to N, and its ratio to the factor path (goal >= 1000x). Because
  un-jitted ``jax.grad`` retraces on every call, the same loop with a jitted
  per-example gradient is timed too;
- peak resident memory of an incident at N and 10N training examples (the
  10N set is the digits tiled ten times with noise), each in a fresh process
  (goal: growth <= 10%).

    .venv/bin/python benchmarks/influence.py            # about 2 minutes on 2 cores
    .venv/bin/python benchmarks/influence.py --quick    # fewer repeats

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import _common
from detectors.batching import padded_batches
from detectors.factors import apply_inverse, compute_factors
from detectors.influence import (
    SolverKind,
    compute_influence,
    incident_gradient,
    make_objective_hvp,
    score_training_examples,
    top_k,
)

L2 = 1e-4
DAMPING = 0.01
BATCH = 512
RANK = 256
SEED_SAMPLE = 100


def median_seconds(function, repeats):
    function()  # compile
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def write_memmaps(folder: Path, x: np.ndarray, y: np.ndarray, copies: int, seed: int):
    n = len(x) * copies
    x_file = np.lib.format.open_memmap(folder / f"x{copies}.npy", mode="w+", dtype=np.float32, shape=(n, x.shape[1]))
    y_file = np.lib.format.open_memmap(folder / f"y{copies}.npy", mode="w+", dtype=np.int32, shape=(n,))
    rng = np.random.default_rng(seed)
    for copy in range(copies):
        noise = 0 if copy == 0 else rng.normal(scale=0.02, size=x.shape)
        x_file[copy * len(x) : (copy + 1) * len(x)] = np.clip(x + noise, 0, 1)
        y_file[copy * len(x) : (copy + 1) * len(x)] = y
    x_file.flush()
    y_file.flush()
    return folder / f"x{copies}.npy", folder / f"y{copies}.npy"


@jax.jit
def _forward_batch(params, x):
    return _common.mlp_apply(params, x)


def forward_pass(params, x, y):
    outputs = [_forward_batch(params, xb) for xb, _, _ in padded_batches(x, y, min(BATCH, len(x)))]
    return np.concatenate([np.asarray(out) for out in outputs])


def seed_style_seconds(loss, params, x, y, direction, sample):
    flat_direction = ravel_pytree(direction)[0]
    started = time.perf_counter()
    for i in range(sample):
        gradient = jax.grad(lambda p: loss(p, jnp.asarray(x[i : i + 1]), jnp.asarray(y[i : i + 1]))[0])(params)
        float(jnp.dot(ravel_pytree(gradient)[0], flat_direction))
    return (time.perf_counter() - started) / sample


def memory_child(x_path: str, y_path: str, params_path: str) -> None:
    """Run one incident on memmapped data and print the peak RSS in MiB (fresh process)."""
    x = np.load(x_path, mmap_mode="r")
    y = np.load(y_path, mmap_mode="r")
    with np.load(params_path) as archive:
        params = {key: jnp.asarray(archive[key]) for key in archive.files}
    loss = _common.cross_entropy(_common.mlp_apply)
    report = compute_influence(loss, params, x, y, np.asarray(x[0]), int(y[0]), l2=L2, damping=DAMPING,
                               tol=1e-4, maxiter=100, batch_size=BATCH)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mib": peak, "n": len(x), "iterations": report.iterations}))


def measure_memory(folder: Path, files, params):
    np.savez(folder / "params.npz", **{key: np.asarray(value) for key, value in params.items()})
    peaks = {}
    for copies, (x_path, y_path) in files.items():
        output = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(x_path), str(y_path), str(folder / "params.npz")],
            check=True, capture_output=True, text=True,
        ).stdout.strip().splitlines()[-1]
        peaks[copies] = json.loads(output)
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a smaller seed-style sample")
    parser.add_argument("--memory-child", nargs=3, metavar=("X", "Y", "PARAMS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    repeats = 3 if args.quick else 7
    sample = 20 if args.quick else SEED_SAMPLE

    train_x, train_y, test_x, test_y = _common.digits(0)
    params = _common.train_adam(_common.mlp_apply, _common.init_mlp(64, 64, 0), train_x, train_y, l2=L2, steps=2000)
    loss = _common.cross_entropy(_common.mlp_apply)
    folder = Path(tempfile.mkdtemp(prefix="poisonwatch-bench-"))
    files = {copies: write_memmaps(folder, train_x, train_y, copies, 0) for copies in (1, 10)}
    x = np.load(files[1][0], mmap_mode="r")
    y = np.load(files[1][1], mmap_mode="r")
    n = len(x)
    probabilities = np.asarray(jax.nn.softmax(_common.mlp_apply(params, jnp.asarray(test_x))))
    incident = int(np.argmax(1 - probabilities[np.arange(len(test_y)), test_y]))
    incident_x, incident_y = test_x[incident], int(test_y[incident])

    forward = median_seconds(lambda: forward_pass(params, x, y), repeats)
    cg_report = compute_influence(loss, params, x, y, incident_x, incident_y, l2=L2, damping=DAMPING,
                                  tol=1e-5, maxiter=500, batch_size=BATCH)
    direction = None

    def cg_incident():
        return compute_influence(loss, params, x, y, incident_x, incident_y, l2=L2, damping=DAMPING,
                                 tol=1e-5, maxiter=500, batch_size=BATCH)

    cg_seconds = median_seconds(cg_incident, max(1, repeats // 2))
    gradient = incident_gradient(loss, params, incident_x, incident_y)
    hvp = make_objective_hvp(loss, params, x, y, l2=L2, damping=DAMPING, batch_size=BATCH)
    direction = apply_inverse(compute_factors(hvp, params, 8, damping=DAMPING, l2=L2), gradient).x
    scoring = median_seconds(lambda: score_training_examples(loss, params, direction, x, y, batch_size=BATCH), repeats)

    started = time.perf_counter()
    factors = compute_factors(hvp, params, RANK, damping=DAMPING, l2=L2)
    factor_seconds = time.perf_counter() - started

    def factor_incident(check):
        return compute_influence(loss, params, x, y, incident_x, incident_y, l2=L2, tol=1e-2, batch_size=BATCH,
                                 solver=SolverKind.FACTORS, factors=factors, check_residual=check)

    factor_fast = median_seconds(lambda: factor_incident(False), repeats)
    factor_checked = median_seconds(lambda: factor_incident(True), repeats)
    factor_report = factor_incident(True)
    overlap = len(set(top_k(factor_report.scores, 10)) & set(top_k(cg_report.scores, 10))) / 10

    per_example = seed_style_seconds(loss, params, x, y, direction, sample)
    flat_direction = ravel_pytree(direction)[0]
    jitted_per_example = median_seconds(
        lambda: [float(jnp.dot(ravel_pytree(incident_gradient(loss, params, x[i], y[i]))[0], flat_direction))
                 for i in range(sample)], 1) / sample
    seed_style = per_example * n + cg_seconds
    memory = measure_memory(folder, files, params)
    growth = memory[10]["peak_rss_mib"] / memory[1]["peak_rss_mib"] - 1

    figures = {
        "benchmark": "influence", "quick": args.quick, "machine": _common.machine(), "n_train": n,
        "parameters": int(ravel_pytree(params)[0].size), "batch_size": BATCH,
        "forward_seconds": forward, "scoring_seconds": scoring, "scoring_over_forward": scoring / forward,
        "incident_cg_seconds": cg_seconds, "cg_iterations": cg_report.iterations, "cg_residual": cg_report.residual,
        "factor_rank": factors.rank, "factor_build_seconds": factor_seconds,
        "incident_factors_seconds": factor_fast, "incident_factors_checked_seconds": factor_checked,
        "factor_residual": factor_report.residual, "factor_captured": factor_report.captured,
        "factor_top10_overlap_with_cg": overlap,
        "seed_style_seconds_per_example": per_example, "seed_style_incident_seconds": seed_style,
        "seed_style_over_factors": seed_style / factor_fast,
        "seed_style_over_factors_checked": seed_style / factor_checked,
        "seed_style_over_cg": seed_style / cg_seconds,
        "jitted_per_example_seconds": jitted_per_example,
        "jitted_per_example_over_factors": (jitted_per_example * n + cg_seconds) / factor_fast,
        "peak_rss_mib_n": memory[1]["peak_rss_mib"], "peak_rss_mib_10n": memory[10]["peak_rss_mib"],
        "peak_rss_growth": growth,
    }
    rows = [
        ("forward pass over N (s)", forward, ""),
        ("scoring pass over N (s)", scoring, f"{scoring / forward:.2f}x forward (goal <= 3x)"),
        ("incident, CG (s)", cg_seconds, f"{cg_report.iterations} iterations, residual {cg_report.residual:.1e}"),
        (f"factors, rank {factors.rank}, once per version (s)", factor_seconds, ""),
        ("incident, factors (s)", factor_fast, f"seed-style / this = {seed_style / factor_fast:.0f}x (goal >= 1000x)"),
        ("incident, factors + residual check (s)", factor_checked,
         f"residual {factor_report.residual:.2f}, top-10 overlap with CG {overlap:.1f}"),
        ("seed-style incident (s)", seed_style, f"{per_example * 1e3:.1f} ms per example, scaled from {sample}"),
        ("jitted per-example gradients, incident (s)", jitted_per_example * n + cg_seconds,
         f"/ factors = {(jitted_per_example * n + cg_seconds) / factor_fast:.0f}x"),
        ("peak RSS at N (MiB)", memory[1]["peak_rss_mib"], ""),
        ("peak RSS at 10N (MiB)", memory[10]["peak_rss_mib"], f"growth {growth * 100:.1f}% (goal <= 10%)"),
    ]
    for name, value, note in rows:
        print(f"{name:<46} {value:>10.4f}  {note}")
    _common.print_json(figures)


if __name__ == "__main__":
    main()
