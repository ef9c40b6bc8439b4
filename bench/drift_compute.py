"""Drift compute: kubeloop's histogram drift against Evidently's data-drift preset and plain scipy.

Same run, same data: 100 features (normal, log-normal, uniform, exponential, Student-t and
integer-valued), a reference sample and a current sample of 100,000 rows each; 10 features of
the current sample are shifted (5 in location by 0.25 sd, 5 in scale by 1.3).

- kubeloop: the reference histograms are built once, at training time (10 quantile buckets a
  feature, ``kubeloop.contract.reference``; timed apart, not counted). Counted: binning the
  current rows into the reference's buckets (what the serving runtime does as rows arrive) plus
  one evaluation of all features from the bucket counts (``kubeloop.planning.drift``), psi with
  ``threshold: auto`` from a warm cache. ``eval_ms`` is the evaluation alone (median).
- Evidently: ``Report([DataDriftPreset()]).run(current, reference)`` with its defaults
  (normed Wasserstein for numerical columns of over 1,000 rows), which bins both samples again
  on every run.
- scipy: the same test as Evidently's default, ``wasserstein_distance(ref, cur) / std(ref)``
  per feature on the raw rows, and ``ks_2samp`` per feature.

Throughput is current rows x features per second (the reference side is precomputed for
kubeloop and rebuilt by the others; ``ratio_vs_evidently_both`` credits Evidently with both
samples' rows). ``false_alarm_rate``: the share of breaches on the 90 unshifted features over
disjoint windows of held-out rows from their own distributions (1,000 windows of 100 rows and
100 of 1,000), all six statistics at ``threshold: auto``; ``family_false_alarm_rate``: the same
windows judged by ``feature: "*"`` with per-feature Šidák rates.

    .venv/bin/python bench/drift_compute.py   # 5 to 8 minutes on 2 cores, most of it Evidently
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats as scipy_stats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from kubeloop.contract.reference import bucket_index, quantile_histogram  # noqa: E402
from kubeloop.planning.drift import (  # noqa: E402
    STATISTICS,
    Reference,
    Statistic,
    Verdict,
    auto_threshold,
    compare,
    per_feature_false_alarm,
    worst_feature,
)

RESULTS = ROOT / "bench" / "results"
FEATURES = 100
ROWS = 100_000
SHIFTED_LOCATION = range(0, 5)
SHIFTED_SCALE = range(5, 10)
TARGETS = {"ratio_vs_evidently": 100.0, "eval_ms": 5.0, "false_alarm_rate": 0.01}

Floats = npt.NDArray[np.float64]


def sample(rng: np.random.Generator, feature: int, rows: int, *, shifted: bool) -> Floats:
    """Feature ``feature``'s values: one of six families; shifted in location or scale (by its
    standard deviation) where ``shifted`` and the feature is one of the first ten."""
    family = feature % 6
    if family == 0:
        x = rng.normal(feature, 1 + feature / 50, rows)
    elif family == 1:
        x = rng.lognormal(0.0, 0.5, rows)
    elif family == 2:
        x = rng.uniform(-feature, feature + 1, rows)
    elif family == 3:
        x = rng.exponential(1 + feature / 10, rows)
    elif family == 4:
        x = rng.standard_t(5, rows)
    else:
        x = rng.poisson(20, rows).astype(np.float64)
    if shifted and feature in SHIFTED_LOCATION:
        x = x + 0.25 * x.std()
    elif shifted and feature in SHIFTED_SCALE:
        x = x.mean() + (x - x.mean()) * 1.3
    return x


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median seconds over ``repeats`` calls, and the last call's result."""
    times = []
    result = None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def bin_rows(edges: list[Floats], columns: Floats, buckets: list[int]) -> list[list[float]]:
    """Each feature's rows (``columns``: one row of values a feature) counted into its reference
    buckets by the runtime's rule; ``buckets`` includes the missing-value bucket where the
    reference has one."""
    return [
        np.bincount(bucket_index(e, column), minlength=b).astype(float).tolist()
        for e, column, b in zip(edges, columns, buckets, strict=True)
    ]


def evaluate(
    refs: list[Reference], counts: list[list[float]], statistic: Statistic, *, auto: bool
) -> list[Verdict]:
    verdicts = []
    for ref, c in zip(refs, counts, strict=True):
        verdict = compare(ref, c, statistic=statistic)
        if auto:
            auto_threshold(ref, verdict.n, statistic)
        verdicts.append(verdict)
    return verdicts


def evidently_run(
    reference: Floats, current: Floats, names: list[str]
) -> tuple[float, list[str]] | None:
    """Evidently's preset on the raw rows: seconds, and the columns it calls drifted."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    try:
        import pandas as pd
        from evidently import DataDefinition, Dataset, Report  # type: ignore[import-untyped, import-not-found, unused-ignore]
        from evidently.presets import DataDriftPreset  # type: ignore[import-untyped, import-not-found, unused-ignore]
    except ImportError:
        return None
    definition = DataDefinition(numerical_columns=names)
    ref = Dataset.from_pandas(pd.DataFrame(reference, columns=names), data_definition=definition)
    cur = Dataset.from_pandas(pd.DataFrame(current, columns=names), data_definition=definition)
    started = time.perf_counter()
    snapshot = Report([DataDriftPreset()]).run(cur, ref)
    seconds = time.perf_counter() - started
    drifted = []
    for metric in snapshot.dict()["metrics"]:
        config = metric.get("config", {})
        is_drift = config.get("type", "").endswith("ValueDrift")
        if is_drift and float(metric["value"]) >= float(config["threshold"]):
            drifted.append(str(config["column"]))
    return seconds, drifted


def false_alarms(
    refs: list[Reference], edges: list[Floats], held_out: Floats, stable: list[int]
) -> dict[str, Any]:
    """Breaches at ``threshold: auto`` on disjoint windows of held-out rows of stable features."""
    buckets = [len(r.fractions) for r in refs]
    per_statistic: dict[str, list[int]] = {s: [0, 0] for s in STATISTICS}
    family = [0, 0]
    family_rate = per_feature_false_alarm(0.01, len(stable))
    for n in (100, 1000):
        windows = ROWS // n
        for w in range(windows):
            rows = held_out[:, w * n : (w + 1) * n]
            counts = {i: bin_rows([edges[i]], rows[[i]], [buckets[i]])[0] for i in stable}
            for statistic in STATISTICS:
                for i in stable:
                    verdict = compare(refs[i], counts[i], statistic=statistic, min_count=n)
                    threshold = auto_threshold(refs[i], verdict.n, statistic)
                    per_statistic[statistic][0] += verdict.outcome(threshold) == "breach"
                    per_statistic[statistic][1] += 1
            verdicts = {
                str(i): compare(refs[i], counts[i], statistic="psi", min_count=n) for i in stable
            }
            limits = {
                str(i): auto_threshold(refs[i], n, "psi", false_alarm=family_rate) for i in stable
            }
            family[0] += worst_feature(verdicts, limits).outcome == "breach"
            family[1] += 1
    rates = {s: breached / total for s, (breached, total) in per_statistic.items()}
    pooled = sum(b for b, _ in per_statistic.values()) / sum(t for _, t in per_statistic.values())
    return {
        "per_statistic": rates,
        "pooled": pooled,
        "windows": sum(t for _, t in per_statistic.values()),
        "family": family[0] / family[1],
        "family_windows": family[1],
    }


def main() -> int:  # noqa: PLR0915 (one linear story: data, three contenders, results)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=3, help="runs of the slow contenders")
    parser.add_argument("--eval-repeats", type=int, default=201, help="evaluations timed")
    parser.add_argument("--no-evidently", action="store_true", help="measure against scipy only")
    args = parser.parse_args()
    rng = np.random.default_rng(20260901)
    names = [f"f{i}" for i in range(FEATURES)]
    reference = np.column_stack([sample(rng, i, ROWS, shifted=False) for i in range(FEATURES)])
    current = np.column_stack([sample(rng, i, ROWS, shifted=True) for i in range(FEATURES)])
    held_out = np.column_stack([sample(rng, i, ROWS, shifted=False) for i in range(FEATURES)])
    shifted = [*SHIFTED_LOCATION, *SHIFTED_SCALE]
    stable = [i for i in range(FEATURES) if i not in shifted]
    figures: dict[str, Any] = {}

    # kubeloop. Training time (not counted): the reference histograms.
    build_s, histograms = timed(
        lambda: [quantile_histogram(reference[:, i]) for i in range(FEATURES)], 1
    )
    edges = [np.asarray(h["edges"], dtype=np.float64) for h in histograms]
    refs = [Reference.of(h["fractions"], h["edges"], rows=ROWS) for h in histograms]
    buckets = [len(r.fractions) for r in refs]
    # Feature-major, as the DataFrames handed to Evidently are (pandas keeps columns together).
    current_columns = np.ascontiguousarray(current.T)
    held_out_columns = np.ascontiguousarray(held_out.T)
    bin_s, counts = timed(lambda: bin_rows(edges, current_columns, buckets), args.repeats)
    cold_started = time.perf_counter()
    evaluate(refs, counts, "psi", auto=True)
    cold_s = time.perf_counter() - cold_started
    eval_s, verdicts = timed(lambda: evaluate(refs, counts, "psi", auto=True), args.eval_repeats)
    eval_by_statistic = {}
    for statistic in STATISTICS:

        def plain(statistic: Statistic = statistic) -> list[Verdict]:
            return evaluate(refs, counts, statistic, auto=False)

        eval_by_statistic[statistic] = timed(plain, args.eval_repeats)[0] * 1000
    ours_s = bin_s + eval_s
    # What a first evaluation at a new window size costs where thresholds are simulated:
    # wasserstein at 1,000 rows (psi at 100,000 rows above uses the chi-square limit).
    window = bin_rows(edges, held_out_columns[:, :1000], buckets)
    cold_started = time.perf_counter()
    evaluate(refs, window, "wasserstein", auto=True)
    cold_simulated_s = time.perf_counter() - cold_started
    psi_auto = {names[i]: auto_threshold(ref, verdicts[i].n, "psi") for i, ref in enumerate(refs)}
    ours_drifted = [
        names[i] for i, v in enumerate(verdicts) if v.outcome(psi_auto[names[i]]) == "breach"
    ]
    # The same, taking the reference's fractions as exact (no allowance for its 100,000 rows).
    exact = [Reference.of(r.fractions, h["edges"]) for r, h in zip(refs, histograms, strict=True)]
    exact_drifted = [
        names[i]
        for i, v in enumerate(evaluate(exact, counts, "psi", auto=False))
        if v.outcome(auto_threshold(exact[i], v.n, "psi")) == "breach"
    ]
    w_verdicts = evaluate(refs, counts, "wasserstein", auto=False)
    ours_w_drifted = [names[i] for i, v in enumerate(w_verdicts) if v.outcome(0.1) == "breach"]
    figures["kubeloop"] = {
        "reference_build_s": build_s,
        "bin_current_s": bin_s,
        "eval_ms": eval_s * 1000,
        "eval_ms_no_threshold": eval_by_statistic,
        "first_eval_with_calibration_ms": cold_s * 1000,
        "first_eval_simulated_wasserstein_1000_rows_ms": cold_simulated_s * 1000,
        "total_s": ours_s,
        "drifted_psi_auto": ours_drifted,
        "drifted_psi_auto_reference_as_exact": exact_drifted,
        "drifted_wasserstein_0.1": ours_w_drifted,
    }
    print("kubeloop", json.dumps(figures["kubeloop"]), flush=True)

    # scipy, on the raw rows.
    def scipy_wasserstein() -> list[float]:
        return [
            float(scipy_stats.wasserstein_distance(reference[:, i], current[:, i]))
            / max(float(np.std(reference[:, i])), 0.001)
            for i in range(FEATURES)
        ]

    scipy_w_s, scipy_w = timed(scipy_wasserstein, args.repeats)
    scipy_ks_s, _ = timed(
        lambda: [scipy_stats.ks_2samp(reference[:, i], current[:, i]) for i in range(FEATURES)],
        args.repeats,
    )
    figures["scipy"] = {
        "wasserstein_s": scipy_w_s,
        "ks_2samp_s": scipy_ks_s,
        "drifted_wasserstein_0.1": [names[i] for i, w in enumerate(scipy_w) if w >= 0.1],
    }
    print("scipy", json.dumps(figures["scipy"]), flush=True)

    # Evidently, on the raw rows.
    evidently_version = None
    runs = []
    if not args.no_evidently:
        for _ in range(args.repeats):
            run = evidently_run(reference, current, names)
            if run is None:
                break
            runs.append(run)
    if runs:
        evidently_version = importlib.metadata.version("evidently")
        figures["evidently"] = {
            "version": evidently_version,
            "preset_s": statistics.median(s for s, _ in runs),
            "runs_s": [s for s, _ in runs],
            "drifted": runs[-1][1],
        }
        print("evidently", json.dumps(figures["evidently"]), flush=True)
    else:
        print("evidently: unavailable (not installed, or --no-evidently); scipy only", flush=True)

    alarms = false_alarms(refs, edges, held_out_columns, stable)
    figures["false_alarms"] = alarms
    print("false_alarms", json.dumps(alarms), flush=True)

    work = ROWS * FEATURES  # current row-features
    result: dict[str, Any] = {}
    if runs:
        result["ratio_vs_evidently"] = figures["evidently"]["preset_s"] / ours_s
        result["ratio_vs_evidently_both"] = 2 * figures["evidently"]["preset_s"] / ours_s
        result["evidently_row_features_per_s"] = work / figures["evidently"]["preset_s"]
    else:
        result["evidently"] = "unavailable"
    result |= {
        "ratio_vs_scipy_wasserstein": scipy_w_s / ours_s,
        "ratio_vs_scipy_ks": scipy_ks_s / ours_s,
        "ours_row_features_per_s": work / ours_s,
        "scipy_row_features_per_s": work / scipy_w_s,
        "bin_ms": bin_s * 1000,
        "eval_ms": eval_s * 1000,
        "first_eval_ms": cold_s * 1000,
        "first_eval_simulated_ms": cold_simulated_s * 1000,
        "false_alarm_rate": alarms["pooled"],
        "false_alarm_max": max(alarms["per_statistic"].values()),
        "family_false_alarm_rate": alarms["family"],
        "detected_true_shifts": sum(1 for n in ours_drifted if int(n[1:]) in shifted),
        "detected_false": sum(1 for n in ours_drifted if int(n[1:]) not in shifted),
        "detected_false_reference_as_exact": sum(
            1 for n in exact_drifted if int(n[1:]) not in shifted
        ),
    }
    met = {
        f"{key} {'>=' if key.startswith('ratio') else '<='} {target:g}": (
            (result[key] >= target) if key.startswith("ratio") else (result[key] <= target)
        )
        for key, target in TARGETS.items()
        if isinstance(result.get(key), float)
    }
    for target, ok in met.items():
        print(f"target {target}: " + ("met" if ok else "NOT met"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "drift_compute.json").write_text(
        json.dumps(
            {
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "settings": {
                    "features": FEATURES,
                    "rows": ROWS,
                    "repeats": args.repeats,
                    "eval_repeats": args.eval_repeats,
                    "shifted": [names[i] for i in shifted],
                },
                "figures": figures,
                "result": result,
                "targets_met": met,
            },
            indent=2,
        )
        + "\n"
    )
    print(
        "RESULT "
        + " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
