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
- peak memory of an incident at N and 10N training examples, each in a
  fresh process (goal: growth <= 10%). This case scores the digits blown up
  to 96x96 pixels, with the same model spread over the larger input, for a
  few CG steps. At 10N that is 10 noisy copies, a 379 MiB ``.npy`` file
  opened with ``mmap_mode="r"`` in a temporary directory. The goal applies to
  anonymous memory (RssAnon: heap and XLA buffers), sampled every 5 ms.
  File-backed RSS (RssFile) is reported apart: pages of the memory map that
  were read stay mapped and count in the total RSS until the kernel reclaims
  them, so it grows with the file even when streaming works. ``ru_maxrss`` is
  not used, because on Linux a child inherits its parent's peak across fork
  and exec, which hid the child's own figure.

    .venv/bin/python benchmarks/influence.py            # about 2 minutes on 2 cores
    .venv/bin/python benchmarks/influence.py --quick    # fewer repeats, 16x16 inputs in the memory case

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
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
# The memory case scores the digits blown up to MEMORY_SIDE x MEMORY_SIDE
# pixels, so 10N (10,780 rows of 36 KiB) is a 379 MiB file. --quick uses 16x16.
MEMORY_SIDE = 96
QUICK_MEMORY_SIDE = 16
# Every CG step reads the whole training set once, so memory does not depend
# on the step count, and a few steps keep the 10N case short.
MEMORY_CG_STEPS = 4


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


def upsample_digits(x: np.ndarray, side: int) -> np.ndarray:
    """Return the 8x8 digits blown up to ``side x side`` pixels (each pixel a square block), flattened."""
    block = side // 8
    images = x.reshape(len(x), 8, 8)
    return np.kron(images, np.ones((1, block, block), np.float32)).reshape(len(x), side * side).astype(np.float32)


def upsample_params(params: dict, side: int) -> dict:
    """Return MLP parameters for ``side x side`` block images that give the same logits as ``params`` on 8x8 digits.

    Each first-layer weight is spread evenly over its pixel's block, so a block
    image of a digit has exactly the digit's hidden activations.
    """
    block = side // 8
    w1 = np.asarray(params["w1"]).reshape(8, 8, -1)
    spread = np.repeat(np.repeat(w1, block, axis=0), block, axis=1) / block**2
    return {**{key: np.asarray(value) for key, value in params.items()}, "w1": spread.reshape(side * side, -1)}


def write_large_memmaps(folder: Path, x: np.ndarray, y: np.ndarray, copies: int, side: int, seed: int):
    """Write ``copies`` noisy copies of the upsampled digits to ``.npy`` files, one copy at a time."""
    n = len(x) * copies
    big = upsample_digits(x, side)
    x_path, y_path = folder / f"big_x{copies}.npy", folder / f"big_y{copies}.npy"
    x_file = np.lib.format.open_memmap(x_path, mode="w+", dtype=np.float32, shape=(n, big.shape[1]))
    y_file = np.lib.format.open_memmap(y_path, mode="w+", dtype=np.int32, shape=(n,))
    rng = np.random.default_rng(seed)
    for copy in range(copies):
        noise = 0 if copy == 0 else rng.normal(scale=0.02, size=big.shape).astype(np.float32)
        x_file[copy * len(x) : (copy + 1) * len(x)] = np.clip(big + noise, 0, 1)
        y_file[copy * len(x) : (copy + 1) * len(x)] = y
    x_file.flush()
    y_file.flush()
    del x_file, y_file
    return x_path, y_path


def read_memory_status() -> dict[str, float]:
    """Return this process's VmRSS, RssAnon, RssFile and VmHWM from ``/proc/self/status``, in MiB."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                fields[name] = int(value.split()[0]) / 1024  # the kernel reports kB
    return fields


class MemorySampler:
    """Record the peak RssAnon and RssFile of this process, sampled every ``interval`` seconds in a thread.

    The kernel keeps a peak only for the total RSS (VmHWM), so the anonymous
    peak is sampled. NOTE: an allocation that lives for less than
    ``interval`` can be missed. A copy of a whole 10N training set would live
    for a whole pass over it, so it would be seen.
    """

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak_anon = 0.0
        self.peak_file = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._record()
            time.sleep(self.interval)

    def _record(self) -> None:
        status = read_memory_status()
        self.peak_anon = max(self.peak_anon, status["RssAnon"])
        self.peak_file = max(self.peak_file, status["RssFile"])

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()
        self._record()


def memory_child(x_path: str, y_path: str, params_path: str, cg_steps: str) -> None:
    """Run one incident on memmapped data in this fresh process and print its peak memory as JSON, in MiB."""
    x = np.load(x_path, mmap_mode="r")
    y = np.load(y_path, mmap_mode="r")
    with np.load(params_path) as archive:
        params = {key: jnp.asarray(archive[key]) for key in archive.files}
    loss = _common.cross_entropy(_common.mlp_apply)
    with MemorySampler() as sampler:
        started = time.perf_counter()
        report = compute_influence(loss, params, x, y, np.asarray(x[0]), int(y[0]), l2=L2, damping=DAMPING,
                                   tol=1e-6, maxiter=int(cg_steps), batch_size=BATCH)
        seconds = time.perf_counter() - started
    print(json.dumps({
        "n": len(x), "file_mib": (x.nbytes + y.nbytes) / 2**20, "iterations": report.iterations, "seconds": seconds,
        "peak_anon_mib": sampler.peak_anon, "peak_file_mib": sampler.peak_file,
        "peak_rss_mib": read_memory_status()["VmHWM"],
    }))


def measure_memory(folder: Path, train_x, train_y, params, side: int, cg_steps: int) -> dict[int, dict]:
    """Score N and 10N upsampled digits from ``.npy`` memory maps, each in a fresh process, and return their peaks."""
    np.savez(folder / "big_params.npz", **upsample_params(params, side))
    peaks = {}
    for copies in (1, 10):
        x_path, y_path = write_large_memmaps(folder, train_x, train_y, copies, side, seed=0)
        command = [sys.executable, __file__, "--memory-child", str(x_path), str(y_path),
                   str(folder / "big_params.npz"), str(cg_steps)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        peaks[copies] = json.loads(output)
        x_path.unlink()
        y_path.unlink()
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a smaller seed-style sample")
    parser.add_argument("--memory-child", nargs=4, metavar=("X", "Y", "PARAMS", "CG_STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    repeats = 3 if args.quick else 7
    sample = 20 if args.quick else SEED_SAMPLE

    train_x, train_y, test_x, test_y = _common.digits(0)
    params = _common.train_adam(_common.mlp_apply, _common.init_mlp(64, 64, 0), train_x, train_y, l2=L2, steps=2000)
    loss = _common.cross_entropy(_common.mlp_apply)
    with tempfile.TemporaryDirectory(prefix="poisonwatch-bench-") as folder:
        run_benchmarks(args, Path(folder), train_x, train_y, test_x, test_y, params, loss, repeats, sample)


def run_benchmarks(args, folder, train_x, train_y, test_x, test_y, params, loss, repeats, sample) -> None:
    files = {1: write_memmaps(folder, train_x, train_y, 1, 0)}
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
    side = QUICK_MEMORY_SIDE if args.quick else MEMORY_SIDE
    memory = measure_memory(folder, train_x, train_y, params, side, MEMORY_CG_STEPS)
    growth = memory[10]["peak_anon_mib"] / memory[1]["peak_anon_mib"] - 1
    total_growth = memory[10]["peak_rss_mib"] / memory[1]["peak_rss_mib"] - 1

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
        "memory_side": side, "memory_inputs": side * side, "memory_cg_steps": MEMORY_CG_STEPS,
        "memory_file_mib_n": memory[1]["file_mib"], "memory_file_mib_10n": memory[10]["file_mib"],
        "memory_incident_seconds_n": memory[1]["seconds"], "memory_incident_seconds_10n": memory[10]["seconds"],
        "peak_anon_mib_n": memory[1]["peak_anon_mib"], "peak_anon_mib_10n": memory[10]["peak_anon_mib"],
        "peak_anon_growth": growth,
        "peak_file_mib_n": memory[1]["peak_file_mib"], "peak_file_mib_10n": memory[10]["peak_file_mib"],
        "peak_rss_mib_n": memory[1]["peak_rss_mib"], "peak_rss_mib_10n": memory[10]["peak_rss_mib"],
        "peak_rss_growth": total_growth,
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
        ("training file at N / 10N (MiB)", memory[10]["file_mib"], f"N: {memory[1]['file_mib']:.1f} MiB, "
         f"{side}x{side} inputs, {MEMORY_CG_STEPS} CG steps"),
        ("peak anonymous RSS at N (MiB)", memory[1]["peak_anon_mib"], ""),
        ("peak anonymous RSS at 10N (MiB)", memory[10]["peak_anon_mib"], f"growth {growth * 100:.1f}% (goal <= 10%)"),
        ("peak file-backed RSS at N (MiB)", memory[1]["peak_file_mib"], "memory-mapped pages, reclaimable"),
        ("peak file-backed RSS at 10N (MiB)", memory[10]["peak_file_mib"], ""),
        ("peak total RSS (VmHWM) at 10N (MiB)", memory[10]["peak_rss_mib"],
         f"N: {memory[1]['peak_rss_mib']:.0f} MiB, growth {total_growth * 100:.1f}%"),
    ]
    for name, value, note in rows:
        print(f"{name:<46} {value:>10.4f}  {note}")
    _common.print_json(figures)


if __name__ == "__main__":
    main()
