"""Tuning efficiency: how many trials each sampler needs to match a full grid search.

Baseline (named): grid search over a 3 x 3 x 3 space — learning rate {1e-3, 1e-2, 1e-1} (log
scale, step = one decade), dropout {0, 0.2, 0.4} and hidden width {16, 64, 256} — for an MLP
on scikit-learn's digits (64 pixel features, 10 classes), objective: validation macro-F1. The
grid runs all 27 trials; its best value is the target. Then ``ml/tune.run_study`` runs each
sampler on the *same* search space with the same 27-trial budget, once per sampler seed:
TPE (``algorithm: bayesian``), random search, CMA-ES (``cmaes``: the learning rate and
dropout; the categorical width is drawn by its independent TPE) and the Gaussian process
(``gp``). The model-based samplers sample the learning rate log-uniformly between the grid's
ends. The figure is the number of trials until the best value so far reaches the grid's best
(budget + 1 when it never does), median over the seeds; random search is the baseline of the
ratios (``<sampler>_trials_vs_random`` < 1: fewer trials than random search needed).
Training is seeded and identical for every trial, so a configuration scores the same whichever
search proposes it.

Pass criterion: median TPE trials ≤ 1/3 of the grid's trials (9 of 27).

The figure depends on the space: with the learning rate over {1e-4, 1e-3, 1e-2} instead (12
epochs a trial) two TPE seeds needed 9 and 14 trials (``--lr-min 1e-4 --lr-max 1e-2 --epochs 12
--quick``), and on the default space random search also matched the grid quickly (median 4,
worst 23 against TPE's worst 8; see ``searches`` in the result file).

    .venv/bin/python bench/tune_efficiency.py            # about 8 minutes on 2 CPU cores
    .venv/bin/python bench/tune_efficiency.py --quick    # 2 seeds
    .venv/bin/python bench/tune_efficiency.py --algorithms bayesian,cmaes   # (+ random)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kubeloop.api.training_run import Imbalance, ModelSpec, Tuning
from kubeloop_pipelines.ml.models import apply_params, arch_from
from kubeloop_pipelines.ml.train import fit
from kubeloop_pipelines.ml.tune import Report, TuneResult, run_study

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
METRIC = "f1"
SEARCH_SPACE: list[dict[str, Any]] = [
    {"name": "learningRate", "type": "float", "min": 1e-3, "max": 1e-1, "step": 1, "log": True},
    {"name": "dropout", "type": "float", "min": 0.0, "max": 0.4, "step": 0.2},
    {"name": "hiddenLayers", "type": "categorical", "values": ["16", "64", "256"]},
]
Arrays = tuple[np.ndarray[Any, Any], ...]
# The samplers compared with the grid, and the RESULT key prefix of each; random search is
# the named baseline of the ratios.
ALGORITHMS = ("bayesian", "random", "cmaes", "gp")
KEYS = {"bayesian": "tpe", "random": "random", "cmaes": "cmaes", "gp": "gp"}
BASELINE = "random"


def digits(seed: int = 0) -> Arrays:
    """Standard-scaled digits, a stratified 70/30 train/validation split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xva, ytr, yva = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    mean, std = xtr.mean(axis=0), xtr.std(axis=0)
    std[std == 0] = 1.0

    def scale(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return np.asarray((a - mean) / std, dtype=np.float32)

    return scale(xtr), ytr.astype(np.int64), scale(xva), yva.astype(np.int64)


def study(algorithm: str, seed: int, data: Arrays, base: ModelSpec, budget: int) -> TuneResult:
    xtr, ytr, xva, yva = data
    tuning = Tuning.model_validate(
        {
            "algorithm": algorithm,
            "objective": {"metric": METRIC, "direction": "maximize"},
            "maxTrials": budget,
            "seed": seed,
            "searchSpace": SEARCH_SPACE,
        }
    )

    def objective(params: dict[str, Any], report: Report) -> float:
        model, _ = apply_params(base, Imbalance(), params)
        arch = arch_from(model, {}, input_shape=(xtr.shape[1],), n_outputs=10)
        result = fit(
            arch, xtr, ytr, xva, yva, task="classification", model=model, metric=METRIC,
            callback=lambda s: report(s.epoch, s.val_metric),
        )  # fmt: skip
        return result.val_metric

    return run_study(tuning, objective, task="classification", max_resource=base.epochs)


def trials_to_reach(result: TuneResult, target: float) -> int:
    """1-based number of the first trial whose value reaches ``target`` (budget + 1: never)."""
    for i, trial in enumerate(result.trials, start=1):
        if trial.value is not None and trial.value >= target - 1e-12:
            return i
    return len(result.trials) + 1


def summarise(
    searches: dict[str, list[dict[str, Any]]], *, grid_trials: int, grid_best: float
) -> dict[str, float]:
    """The RESULT figures: per sampler the median and worst trials to reach the grid's best,
    the median best value and seconds, and the median trials as a ratio of random search's."""
    figures: dict[str, float] = {"grid_trials": float(grid_trials), "grid_best": grid_best}
    baseline = statistics.median(r["trials_to_reach_grid_best"] for r in searches[BASELINE])
    for algorithm, runs in searches.items():
        reached_after = [r["trials_to_reach_grid_best"] for r in runs]
        key = KEYS[algorithm]
        median_trials = float(statistics.median(reached_after))
        figures[f"{key}_median_trials_to_grid_best"] = median_trials
        figures[f"{key}_max_trials_to_grid_best"] = float(max(reached_after))
        figures[f"{key}_median_best"] = statistics.median(r["best_value"] for r in runs)
        figures[f"{key}_median_seconds"] = statistics.median(r["seconds"] for r in runs)
        if algorithm == "bayesian":
            figures["tpe_fraction_of_grid_trials"] = median_trials / grid_trials
        if algorithm != BASELINE:
            figures[f"{key}_trials_vs_random"] = median_trials / baseline
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seeds", type=int, default=5, help="seeds per sampler")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per trial")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--algorithms",
        default=",".join(ALGORITHMS),
        help="comma-separated samplers to compare (random, the baseline, always runs)",
    )
    parser.add_argument("--lr-min", type=float, default=1e-3, help="learning-rate grid start")
    parser.add_argument("--lr-max", type=float, default=1e-1, help="learning-rate grid end")
    parser.add_argument("--quick", action="store_true", help="2 seeds")
    args = parser.parse_args()
    SEARCH_SPACE[0].update(min=args.lr_min, max=args.lr_max)
    if args.quick:
        args.seeds = 2
    asked = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = sorted(set(asked) - set(ALGORITHMS))
    if unknown:
        parser.error(f"--algorithms: {unknown} unknown; expected some of {list(ALGORITHMS)}")
    algorithms = [a for a in ALGORITHMS if a in asked or a == BASELINE]
    torch.set_num_threads(args.threads)
    data = digits()
    base = ModelSpec(epochs=args.epochs, batch_size=64, early_stopping=None, lr_schedule="cosine")
    started = time.perf_counter()

    grid = study("grid", 0, data, base, budget=27)
    budget = len(grid.trials)  # the same budget: every search gets the grid's 27 trials
    target = grid.best_value
    print(f"grid: {len(grid.trials)} trials, best {METRIC}={target:.4f} {grid.best_params}")
    print(f"      {grid.seconds:.1f} s, {grid.seconds / len(grid.trials):.2f} s a trial")

    searches: dict[str, list[dict[str, Any]]] = {}
    for algorithm in algorithms:
        for seed in range(args.seeds):
            result = study(algorithm, seed, data, base, budget=budget)
            reached = trials_to_reach(result, target)
            searches.setdefault(algorithm, []).append(
                {
                    "seed": seed,
                    "trials_to_reach_grid_best": reached,
                    "best_value": result.best_value,
                    "best_params": result.best_params,
                    "values": [t.value for t in result.trials],
                    "seconds": result.seconds,
                    "sampler": result.sampler,
                }
            )
            shown = reached if reached <= budget else f"not within {budget}"
            print(
                f"{algorithm:8s} seed {seed}: reached grid best after {shown} trials; "
                f"best {METRIC}={result.best_value:.4f}; {result.seconds:.1f} s "
                f"({result.sampler})",
                flush=True,
            )

    result_figures = summarise(searches, grid_trials=len(grid.trials), grid_best=target)
    passed = True
    if "bayesian" in searches:
        median = result_figures["tpe_median_trials_to_grid_best"]
        passed = median <= len(grid.trials) / 3
        print(
            f"target TPE <= 1/3 of grid's trials ({len(grid.trials) / 3:g}): "
            f"{'met' if passed else 'NOT met'} (median {median:g})"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tune_efficiency.json").write_text(
        json.dumps(
            {
                "machine": {
                    "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(),
                },
                "settings": {
                    "dataset": "digits (sklearn), 70/30 stratified split, standard-scaled",
                    "metric": METRIC,
                    "epochs": args.epochs,
                    "search_space": SEARCH_SPACE,
                    "seeds": args.seeds,
                    "quick": args.quick,
                    "algorithms": algorithms,
                    "baseline": BASELINE,
                },
                "grid": {
                    "best_value": target,
                    "best_params": grid.best_params,
                    "values": {json.dumps(t.params, sort_keys=True): t.value for t in grid.trials},
                    "seconds": grid.seconds,
                },
                "searches": searches,
                "result": result_figures,
                "target_met": passed,
                "seconds": time.perf_counter() - started,
            },
            indent=2,
        )
        + "\n"
    )
    print("RESULT " + " ".join(f"{k}={v:.4g}" for k, v in result_figures.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
