"""Gradient-boosted trees (ONNX) against the MLP (torch.export) on the built-in fraud table.

Both are trained by the real pipeline steps (ingest → preprocess → train) on the same split
(``examples/02``'s: 15 % validation, 15 % test, stratified, seed 7) and preprocessing: the MLP
as in ``examples/02`` without tuning (64-32, focal loss), the forest with class weights. Then,
in one process, both artifacts are served through the runtime's ``Predictor`` (direct runner,
no batching) and timed: median and p99 of ``predict`` for one row and for a batch of 32,
``--repeats`` calls each after a warm-up, one intra-op thread each. Quality on the test split:
PR-AUC, ROC-AUC and the minority (fraud) recall at the 0.5 threshold.

    .venv/bin/python bench/serving_gbdt.py          # about a minute on 2 cores

Last line: ``RESULT gbdt_p50_ms=… mlp_p50_ms=… ratio_gbdt_vs_mlp=…`` (single-row medians).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from kubeloop.api.training_run import TrainingRunSpec  # noqa: E402
from kubeloop.serving.predictor import Predictor, ServingOptions  # noqa: E402
from kubeloop_pipelines.ml.evaluate import compute_metrics  # noqa: E402
from kubeloop_pipelines.ml.preprocess import load_prepared  # noqa: E402
from kubeloop_pipelines.progress import StepReport  # noqa: E402
from kubeloop_pipelines.steps import ingest, preprocess, train  # noqa: E402

RESULTS = ROOT / "bench" / "results"
COMMON: dict[str, Any] = {
    "data": {
        "uri": "builtin://fraud", "target": "is_fraud", "task": "classification",
        "split": {"validation": 0.15, "test": 0.15, "stratify": True, "seed": 7},
    },
    "preprocessing": {
        "missing": {"strategy": "median"},
        "outliers": {"method": "iqr", "action": "clip", "threshold": 3},
        "scaling": "standard",
    },
    "registration": {"modelName": "fraud"},
}  # fmt: skip
MLP = {
    "model": {"family": "mlp", "hiddenLayers": [64, 32], "dropout": 0.1, "epochs": 40,
              "batchSize": 256},
    "imbalance": {"strategy": "focal_loss", "focalGamma": 2},
}  # fmt: skip
GBDT = {
    "model": {"family": "lightgbm", "earlyStopping": {"patience": 30},
              "trees": {"numLeaves": 15, "minChildSamples": 40, "learningRate": 0.05,
                        "nEstimators": 600, "subsample": 0.8, "colsampleBytree": 0.8,
                        "regLambda": 1.0}},
    "imbalance": {"strategy": "class_weights"},
}  # fmt: skip


def train_model(root: Path, family: dict[str, Any]) -> tuple[Path, Path]:
    """The real ingest → preprocess → train steps: (prepared_dir, model_dir)."""
    spec = TrainingRunSpec.model_validate(COMMON | family)
    ingest.run(spec, report=StepReport("", "ingest"), run_uri="", dataset_dir=root / "raw")
    preprocess.run(
        spec, report=StepReport("", "preprocess"), run_uri="", raw_dir=root / "raw",
        prepared_dir=root / "prepared", report_html=root / "quality.html",
    )  # fmt: skip
    train.run(
        spec, report=StepReport("", "train"), run_uri="", prepared_dir=root / "prepared",
        params_path=root / "none.json", model_dir=root / "model", curves_html=root / "c.html",
    )  # fmt: skip
    return root / "prepared", root / "model"


async def latencies(predictor: Predictor, rows: np.ndarray[Any, Any], repeats: int) -> list[float]:
    for i in range(20):
        await predictor.predict(rows, request_id=f"warm-{i}")
    times = []
    for i in range(repeats):
        started = time.perf_counter()
        await predictor.predict(rows, request_id=f"r-{i}")
        times.append((time.perf_counter() - started) * 1000.0)
    return times


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "p50_ms": statistics.median(ordered),
        "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    }


async def measure(model_dir: Path, prepared_dir: Path, repeats: int) -> dict[str, Any]:
    predictor = Predictor.load("bench", "v1", model_dir, ServingOptions())
    prepared = load_prepared(prepared_dir)
    rows = np.asarray(prepared.serving_rows("test"), dtype=np.float32)
    quality = compute_metrics(
        "classification", prepared.y_test, predictor.model.predict(rows),
        classes=predictor.model.classes,
    )  # fmt: skip
    single = summary(await latencies(predictor, rows[:1], repeats))
    batch = summary(await latencies(predictor, rows[:32], repeats))
    await predictor.close()
    return {
        "artifact": type(predictor.model).__name__,
        "single": single,
        "batch32": batch,
        "pr_auc": quality["pr_auc"],
        "roc_auc": quality["roc_auc"],
        "minority_recall": quality["minority_recall"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kubeloop-bench-gbdt-") as tmp:
        for name, family in (("gbdt", GBDT), ("mlp", MLP)):
            started = time.perf_counter()
            prepared, model = train_model(Path(tmp) / name, family)
            results[name] = asyncio.run(measure(model, prepared, args.repeats))
            results[name]["train_s"] = time.perf_counter() - started
            print(name, json.dumps(results[name], default=float))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serving_gbdt.json").write_text(json.dumps(results, indent=2) + "\n")
    gbdt, mlp = results["gbdt"]["single"]["p50_ms"], results["mlp"]["single"]["p50_ms"]
    print(f"RESULT gbdt_p50_ms={gbdt:.4f} mlp_p50_ms={mlp:.4f} ratio_gbdt_vs_mlp={gbdt / mlp:.3f}")


if __name__ == "__main__":
    main()
