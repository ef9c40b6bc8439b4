"""The canary's prediction-shift check, without a cluster: real served versions (the runtime's
``Predictor`` with its ``ServingMetrics``) answer real rows, and the PSI is computed exactly as
the analysis computes it — ``planning.canary.psi`` of the stable's prediction-bucket counts
since the rollout began against the canary's over one analysis window (the vectors
``planning.promql.builtin_queries`` asks Prometheus for, see ``backends/canary_metrics.py``).

At ``MAX_PREDICTION_SHIFT`` (the threshold the deployment e2e tests and the canary bench use)
a retrained version of the same quality passes every window and a version whose predictions
are shifted (the same network served without its scaling: training/serving skew) fails every
window. It only works because every version buckets its scores on the same edges.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from kubeloop.contract import serving_metrics as names
from kubeloop.contract.reference import CLASSIFIER_EDGES
from kubeloop.contract.serving_metrics import bucket_labels
from kubeloop.planning.canary import psi
from kubeloop.planning.promql import builtin_queries
from kubeloop.serving.predictor import Predictor, ServingOptions
from kubeloop.serving.samples import breast_cancer, train_tabular_model, write_skewed_model
from tests.conftest import ROOT

MAX_PREDICTION_SHIFT = 2.0
MODEL = "shift"
# The e2e rollout: 40 requests/s for an interval of 4 s, the canary at 20 % (about 32 of 160).
WINDOW_REQUESTS, CANARY_SHARE, WINDOWS = 160, 0.2, 12


@pytest.fixture(scope="module")
async def versions(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[str, Predictor]]:
    root = tmp_path_factory.mktemp("shift")
    dirs = {
        "shift-v1": train_tabular_model(root / "v1", seed=1),
        "shift-v2": train_tabular_model(root / "v2", seed=2),  # retrained: same quality
        "shift-v3": write_skewed_model(root / "v3", seed=2),  # served without its scaling
    }
    loaded = {v: Predictor.load(MODEL, v, d, ServingOptions()) for v, d in dirs.items()}
    yield loaded
    for predictor in loaded.values():
        await predictor.close()


def prediction_counts(version: str) -> dict[str, float]:
    """What ``sum by (bucket) (...)`` over ``kubeloop_prediction_bucket_total`` of one version
    reads, taken from the runtime's registry (a difference of two of these is ``increase``)."""
    wanted = names.total(names.PREDICTION_BUCKETS)
    counts: dict[str, float] = {}
    for family in REGISTRY.collect():
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == wanted
                and labels.get(names.MODEL_LABEL) == MODEL
                and labels.get(names.VERSION_LABEL) == version
            ):
                bucket = labels[names.BUCKET_LABEL]
                counts[bucket] = counts.get(bucket, 0.0) + sample.value
    return counts


def increase(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {bucket: after[bucket] - before.get(bucket, 0.0) for bucket in after}


def test_the_analysis_queries_the_series_counted_here() -> None:
    query = builtin_queries("ns", MODEL, "shift-v2", "4s")["prediction_fractions"]
    assert names.total(names.PREDICTION_BUCKETS) in query
    assert re.search(rf"sum by \(\s*{names.BUCKET_LABEL}\s*\)", query), query


async def rollout_windows(
    stable: Predictor, canary: Predictor, rows: np.ndarray, seed: int
) -> list[float]:
    """PSI of every analysis window of a rollout at the first step: requests routed at random
    (20 % to the canary), the stable's baseline growing from the rollout's start."""
    rng = np.random.default_rng(seed)
    stable_start = prediction_counts(stable.version)
    shifts: list[float] = []
    request = 0
    for _ in range(WINDOWS):
        canary_before = prediction_counts(canary.version)
        for _ in range(WINDOW_REQUESTS):
            row = rows[request % len(rows)][None, :]
            target = canary if rng.random() < CANARY_SHARE else stable
            await target.predict(row, request_id=f"r{request}")
            request += 1
        theirs = increase(prediction_counts(stable.version), stable_start)
        mine = increase(prediction_counts(canary.version), canary_before)
        value = psi(theirs, mine)
        assert value is not None
        shifts.append(value)
    return shifts


async def test_a_good_canary_passes_and_a_shifted_one_fails(
    versions: dict[str, Predictor],
) -> None:
    x, _, _ = breast_cancer()
    traffic = x[np.random.default_rng(7).permutation(len(x))]  # real rows, in a random order
    stable, good, shifted = versions["shift-v1"], versions["shift-v2"], versions["shift-v3"]
    # every version buckets the same score ranges, the missing bucket included
    for predictor in versions.values():
        assert predictor.metrics.prediction_edges.tolist() == list(CLASSIFIER_EDGES)
        assert set(prediction_counts(predictor.version)) == set(bucket_labels(10))

    good_shifts = await rollout_windows(stable, good, traffic, seed=1)
    bad_shifts = await rollout_windows(stable, shifted, traffic, seed=1)
    print(f"PSI good canary: max {max(good_shifts):.3f}; shifted canary: min {min(bad_shifts):.3f}")
    assert max(good_shifts) < MAX_PREDICTION_SHIFT, good_shifts
    assert min(bad_shifts) > MAX_PREDICTION_SHIFT, bad_shifts
    assert min(bad_shifts) > 2 * max(good_shifts)  # far apart, not on either side by luck


async def test_the_e2e_traffic_of_one_row_does_not_move_a_good_canary(
    versions: dict[str, Predictor],
) -> None:
    """The deployment e2e tests and the canary bench send the first data row again and
    again; both healthy versions put its score in the same bucket."""
    x, _, _ = breast_cancer()
    shifts = await rollout_windows(versions["shift-v1"], versions["shift-v2"], x[:1], seed=2)
    assert max(shifts) < MAX_PREDICTION_SHIFT


def test_the_e2e_tests_and_the_canary_bench_check_prediction_shift_at_this_threshold() -> None:
    for path in (
        ROOT / "tests/integration/test_model_deployment.py",
        ROOT / "bench/canary_timing.py",
    ):
        values = re.findall(r'"maxPredictionShift":\s*([0-9.]+)', Path(path).read_text())
        assert values, f"{path} does not set maxPredictionShift"
        assert {float(v) for v in values} == {MAX_PREDICTION_SHIFT}, (path, values)
