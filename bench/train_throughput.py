"""Training throughput: samples/s of ``ml/train.fit`` for the MLP, CPU vs GPU, fp32 vs bf16.

Baseline (named): CPU, fp32, batch 256 — what a training pod without a GPU gets. Measured, in
one run, for batch sizes 64/256/1024: CPU fp32, and where CUDA is available GPU fp32 and GPU
bf16 autocast (``model.mixedPrecision``). Two networks: the spec's default MLP (64, 32), whose
steps are so small that launch overhead dominates, and a wide MLP (3 x 1024) whose compute
does. Throughput counts training passes only (``FitResult.train_samples_per_s``: forward,
backward and optimiser step, not the per-epoch validation); each figure is the median of
``--repeats`` fits after a warm-up fit on the same device.

    .venv/bin/python bench/train_throughput.py --threads 1   # about 30 s on 2 CPU cores
    .venv/bin/python bench/train_throughput.py --quick       # about 10 s

``--threads`` matters for the small network on a shared CPU: on a 2-core box with other work
running, two intra-op threads made batch-64 steps of the default MLP about 10x slower than one
thread (threads wait on each other); the kept result was measured with ``--threads 1``.
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

from kubeloop.api.training_run import ModelSpec
from kubeloop_pipelines.ml.models import arch_from
from kubeloop_pipelines.ml.train import fit

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
FEATURES = 30
BATCHES = (64, 256, 1024)
BASELINE = "cpu_fp32_b256"
NETWORKS = {"default": [64, 32], "wide": [1024, 1024, 1024]}


def synthetic(rows: int, seed: int = 0) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """A learnable binary table: the label is the sign of a random projection plus noise."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, FEATURES)).astype(np.float32)
    w = rng.standard_normal(FEATURES)
    y = (x @ w + 0.5 * rng.standard_normal(rows) > 0).astype(np.int64)
    return x, y


def throughput(
    hidden: list[int], *, device: str, bf16: bool, batch: int, rows: int, epochs: int
) -> float:
    x, y = synthetic(rows)
    xv, yv = synthetic(512, seed=1)
    model = ModelSpec(
        hidden_layers=hidden, epochs=epochs, batch_size=batch, early_stopping=None,
        lr_schedule="none", mixed_precision=bf16,
    )  # fmt: skip
    arch = arch_from(model, {}, input_shape=(FEATURES,), n_outputs=2)
    result = fit(arch, x, y, xv, yv, task="classification", model=model, device=device)
    return result.train_samples_per_s


def configs(cuda: bool) -> list[tuple[str, str, bool, int]]:
    """(name, device, bf16, batch) of every measurement."""
    out = [(f"cpu_fp32_b{b}", "cpu", False, b) for b in BATCHES]
    if cuda:
        out += [(f"cuda_fp32_b{b}", "cuda", False, b) for b in BATCHES]
        out += [(f"cuda_bf16_b{b}", "cuda", True, b) for b in BATCHES]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=16384, help="training rows (default MLP)")
    parser.add_argument("--wide-rows", type=int, default=4096, help="training rows (wide MLP)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--no-wide", action="store_true", help="skip the wide MLP")
    parser.add_argument("--quick", action="store_true", help="fewer rows, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.wide_rows, args.repeats, args.epochs = 4096, 1024, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    networks = {k: v for k, v in NETWORKS.items() if not (args.no_wide and k == "wide")}

    figures: dict[str, dict[str, float]] = {}
    started = time.perf_counter()
    for net, hidden in networks.items():
        rows = args.rows if net == "default" else args.wide_rows
        warmed: set[str] = set()
        for name, device, bf16, batch in configs(cuda):
            if device not in warmed:  # first use: allocator, kernels, cuBLAS handles
                throughput(hidden, device=device, bf16=bf16, batch=batch, rows=1024, epochs=1)
                warmed.add(device)
            runs = [
                throughput(
                    hidden, device=device, bf16=bf16, batch=batch, rows=rows, epochs=args.epochs
                )
                for _ in range(args.repeats)
            ]
            figures.setdefault(net, {})[name] = statistics.median(runs)
            print(f"{net:8s} {name:16s} {figures[net][name]:12.0f} samples/s", flush=True)

    result: dict[str, float] = {}
    for net, by_config in figures.items():
        base = by_config[BASELINE]
        for name, value in by_config.items():
            result[f"{net}_{name}_samples_per_s"] = value
        if cuda:
            best_gpu = max(v for k, v in by_config.items() if k.startswith("cuda"))
            result[f"{net}_ratio_best_gpu_over_baseline"] = best_gpu / base
            for b in BATCHES:
                result[f"{net}_ratio_gpu_fp32_over_cpu_fp32_b{b}"] = (
                    by_config[f"cuda_fp32_b{b}"] / by_config[f"cpu_fp32_b{b}"]
                )
                result[f"{net}_ratio_bf16_over_fp32_b{b}"] = (
                    by_config[f"cuda_bf16_b{b}"] / by_config[f"cuda_fp32_b{b}"]
                )
        for b in BATCHES:
            result[f"{net}_ratio_cpu_b{b}_over_baseline"] = by_config[f"cpu_fp32_b{b}"] / base

    device_name = torch.cuda.get_device_name(0) if cuda else ""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_throughput.json").write_text(
        json.dumps(
            {
                "machine": {
                    "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "cuda": device_name or None,
                },
                "settings": {
                    "rows": args.rows,
                    "wide_rows": args.wide_rows,
                    "epochs": args.epochs,
                    "repeats": args.repeats,
                    "features": FEATURES,
                    "networks": networks,
                    "batches": list(BATCHES),
                    "baseline": BASELINE,
                    "quick": args.quick,
                },
                "samples_per_s": figures,
                "result": result,
                "seconds": time.perf_counter() - started,
            },
            indent=2,
        )
        + "\n"
    )
    if not cuda:
        print("no CUDA device: GPU and bf16 figures not measured")
    print("RESULT " + " ".join(f"{k}={v:.3f}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
