"""int8 quantisation on the CPU: torchao's int8 dynamic-activation/int8-weight variant against
the fp32 model it came from (the named baseline, measured in the same run, same way).

Both are measured as serving runs them (``ml/optimize.measure``): the network behind its
standard scaling, exported with ``torch.export`` (dynamic batch) and decomposed to aten ops,
on one intra-op thread; latency is the median of ``--calls`` calls, at the serving batch size
(32 rows) and at one row, and each figure is the median over ``--rounds`` rounds that time
fp32 and int8 in turn (``ml/optimize.time_variants``).
Also recorded: the same ratio for the eager (not exported) modules, the accuracy on a held-out
split and whether the optimisation step would keep int8 by its rule (speed-up >= 1.5x and an
accuracy drop of at most 0.5 points). Models: the pipeline's default breast-cancer MLP
(64-32, BatchNorm) and a wide MLP (3 x 1024) on the same data, both trained here.

    .venv/bin/python bench/optimize_int8.py            # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "pipelines"))
sys.path.insert(0, str(ROOT / "operator"))
from kubeloop.api.training_run import ModelSpec  # noqa: E402
from kubeloop.serving.samples import Standardise, breast_cancer  # noqa: E402
from kubeloop_pipelines.ml import optimize as opt  # noqa: E402
from kubeloop_pipelines.ml.evaluate import SERVING_BATCH  # noqa: E402
from kubeloop_pipelines.ml.train import fit  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MAX_DROP = 0.005
MIN_SPEEDUP = 1.5
MODELS = {"breast_cancer_mlp": [64, 32], "wide_mlp": [1024, 1024, 1024]}


def data() -> dict[str, Any]:
    """Breast cancer, split 70/15/15 (seeded, stratified), scaling fitted on the train rows."""
    from sklearn.model_selection import train_test_split

    x, y, _ = breast_cancer()
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=0.3, stratify=y, random_state=42
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=42
    )
    mean, scale = x_train.mean(axis=0), x_train.std(axis=0)
    scale[scale == 0] = 1.0
    return {
        "x_train": (x_train - mean) / scale, "y_train": y_train,
        "x_val": (x_val - mean) / scale, "y_val": y_val,
        "x_test": x_test, "y_test": y_test, "transform": Standardise(mean, scale),
    }  # fmt: skip


def train(hidden: list[int], d: dict[str, Any]) -> nn.Module:
    arch = {"family": "mlp", "input_shape": [30], "n_outputs": 2, "hidden_layers": hidden,
            "dropout": 0.1, "batch_norm": True}  # fmt: skip
    result = fit(
        arch, d["x_train"], d["y_train"], d["x_val"], d["y_val"], task="classification",
        model=ModelSpec(epochs=30, learning_rate=1e-3), metric="accuracy", device="cpu",
    )  # fmt: skip
    return result.module.eval()


def eager_ratio(fp32: nn.Module, int8: nn.Module, rows: np.ndarray[Any, Any], args: Any) -> float:
    """The same ratio for the eager modules (not exported), timed the same way."""
    eager = [opt.Variant(name, m, runner=m) for name, m in (("fp32", fp32), ("int8", int8))]
    opt.time_variants(eager, rows, rounds=args.rounds, repeats=args.calls, threads=args.threads)
    return eager[1].latency_ms / eager[0].latency_ms


def bench_model(name: str, hidden: list[int], d: dict[str, Any], args: Any) -> dict[str, Any]:
    torch.manual_seed(0)
    net = train(hidden, d)
    int8_net = opt.quantize_int8(net)
    common: dict[str, Any] = {
        "serve": lambda n: nn.Sequential(d["transform"], n), "rows": d["x_test"],
        "y": d["y_test"], "task": "classification", "classes": ["malignant", "benign"],
        "metric": "accuracy", "timed": False,
    }  # fmt: skip
    base = opt.measure(opt.Variant("baseline", net), **common)
    quant = opt.measure(opt.Variant("int8", int8_net), **common)
    # Interleaved rounds, so a busy moment of the machine hits both alike.
    opt.time_variants(
        [base, quant], d["x_test"], rounds=args.rounds, repeats=args.calls, threads=args.threads
    )
    opt.choose_variant(base, [quant], MAX_DROP, MIN_SPEEDUP, metric="accuracy")
    served_fp32 = nn.Sequential(d["transform"], net).eval()
    served_int8 = nn.Sequential(d["transform"], int8_net).eval()
    figure = {
        "hidden_layers": hidden,
        "parameters": opt.count_parameters(net),
        "fp32": {k: v for k, v in base.row().items() if k not in ("reason", "status")},
        "int8": quant.row(),
        "ratio_latency_b32_int8_over_fp32": quant.latency_ms / base.latency_ms,
        "ratio_latency_b1_int8_over_fp32": quant.latency_ms_b1 / base.latency_ms_b1,
        "ratio_latency_b32_eager_int8_over_fp32": eager_ratio(
            served_fp32, served_int8, d["x_test"], args
        ),
        "accuracy_delta_points": 100 * (quant.score - base.score),
        "kept": quant.status == "kept",
    }
    print(name, json.dumps({k: v for k, v in figure.items() if k.startswith(("ratio", "acc"))}))
    return figure


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=200, help="timed calls per median")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads while timing")
    args = parser.parse_args()
    d = data()
    figures = {name: bench_model(name, hidden, d, args) for name, hidden in MODELS.items()}
    result: dict[str, float] = {}
    for name, f in figures.items():
        result[f"{name}_fp32_b32_ms"] = f["fp32"]["latency_ms"]
        result[f"{name}_int8_b32_ms"] = f["int8"]["latency_ms"]
        result[f"{name}_ratio_b32_int8_over_fp32"] = f["ratio_latency_b32_int8_over_fp32"]
        result[f"{name}_ratio_b1_int8_over_fp32"] = f["ratio_latency_b1_int8_over_fp32"]
        result[f"{name}_accuracy_delta_points"] = f["accuracy_delta_points"]
        result[f"{name}_kept"] = float(f["kept"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "optimize_int8.json").write_text(
        json.dumps(
            {
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "torchao": __import__("torchao").__version__,
                },
                "settings": {
                    "serving_batch": SERVING_BATCH,
                    "calls": args.calls,
                    "rounds": args.rounds,
                    "threads": args.threads,
                    "rule": {"max_accuracy_drop": MAX_DROP, "min_speedup": MIN_SPEEDUP},
                    "baseline": "fp32 model, same export path, same run",
                },
                "figures": figures,
                "result": result,
            },
            indent=2,
            default=float,
        )
        + "\n"
    )
    print("RESULT " + " ".join(f"{k}={v:.3f}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
