"""optimize: pruned, int8 and distilled variants of the trained model, measured as served and
kept only within the budget of ``spec.optimization`` (see ``ml/optimize.py``).

With nothing requested the model directory is copied unchanged. Otherwise ``optimized_dir``
becomes a complete model directory of the chosen variant (the baseline when none is kept):

- ``model.pt2``: the very program that was measured (transforms baked in, decomposed to aten
  ops, so an int8 program loads without torchao); ``model.json`` is the trained model's;
- ``arch.json`` + ``state.pt``: the chosen network (the student's for distillation; for int8
  the fp32 weights it was quantised from, which explanations use);
- ``history.json``/``params.json``: the trained model's (no history for a student);
- ``optimization.json``: every variant measured, kept or rejected and why, and the choice.

A forest (``model.family: lightgbm``, the ``onnx`` artifact) is copied unchanged: every
variant here rewrites a torch network, so each requested one is recorded as unsupported with
its reason in ``optimization.json``.

Publishes ``reports/optimization.html``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kubeloop.api.training_run import TrainingRunSpec
from kubeloop.contract.artifact import METADATA_FILE, PROGRAM_FILE
from kubeloop.contract.evaluation import QUALITY_METRICS_BY_TASK
from kubeloop.contract.reference import histogram, prediction_edges, prediction_score
from kubeloop_pipelines.contract import (
    ARCH_FILE,
    HISTORY_FILE,
    STATE_FILE,
    StepResult,
    write_json,
)
from kubeloop_pipelines.ml import optimize as opt
from kubeloop_pipelines.ml.evaluate import SERVING_BATCH, html_page, html_table
from kubeloop_pipelines.ml.gbdt import is_tree_model
from kubeloop_pipelines.ml.models import build_model
from kubeloop_pipelines.ml.preprocess import Prepared, load_prepared
from kubeloop_pipelines.ml.train import load_trained, serving_module
from kubeloop_pipelines.progress import StepReport, publish

REPORT = "reports/optimization.html"
OPTIMIZATION_FILE = "optimization.json"
# Why each variant does not apply to an ONNX forest.
TREE_SKIPS = {
    "pruned": "magnitude pruning zeroes network weights; a forest's size is set by "
    "model.trees (numLeaves, nEstimators)",
    "int8": "int8 (torchao) quantises torch linear layers; an ONNX forest has none",
    "distilled": "distillation trains an MLP student on a network teacher's logits; not "
    "offered for forests",
    "bf16": "gradient-boosted trees run in fp32 on onnxruntime's CPU provider",
}


def objective_metric(spec: TrainingRunSpec, task: str) -> str:
    """The tuning objective when it is a quality metric of this task, else accuracy / r2."""
    if spec.tuning is not None and spec.tuning.objective.metric in QUALITY_METRICS_BY_TASK[task]:
        return spec.tuning.objective.metric
    return "accuracy" if task == "classification" else "r2"


def requested(spec: TrainingRunSpec) -> bool:
    o = spec.optimization
    return o.pruning > 0 or o.quantize_int8 or bool(o.distill_hidden_layers)


def _build_variants(
    spec: TrainingRunSpec,
    net: nn.Module,
    arch: dict[str, Any],
    prepared: Prepared,
    report: StepReport,
) -> tuple[list[opt.Variant], dict[str, Any]]:
    """The requested variants (modules, not yet measured) and the student arch if any."""
    o = spec.optimization
    variants: list[opt.Variant] = []
    student_arch: dict[str, Any] = {}
    if o.pruning > 0:
        report.update(message=f"pruning {o.pruning:.0%} of the weights", force=True)
        pruned, achieved = opt.prune_magnitude(net, o.pruning)
        variants.append(opt.Variant("pruned", pruned, details={"sparsity": achieved}))
    if o.quantize_int8:
        report.update(message="quantising to int8 (torchao)", force=True)
        try:
            variants.append(opt.Variant("int8", opt.quantize_int8(net)))
        except Exception as exc:  # torchao raises its own types for unsupported layers
            variants.append(
                opt.Variant("int8", None, status="unsupported", reason=f"torchao: {exc}")
            )
    if o.distill_hidden_layers:
        if str(prepared.modality) == "text":
            variants.append(
                opt.Variant(
                    "distilled", None, status="unsupported",
                    reason="distillation trains an MLP student, which cannot read token ids; "
                    "leave optimization.distillHiddenLayers empty for text models",
                )
            )  # fmt: skip
        else:
            report.update(message=f"distilling into an MLP {o.distill_hidden_layers}", force=True)
            student_arch = {
                key: value for key, value in arch.items()
                if key in ("input_shape", "n_outputs", "dropout", "batch_norm", "target_mean",
                           "target_scale")
            }  # fmt: skip
            student_arch.update(family="mlp", hidden_layers=list(o.distill_hidden_layers))
            torch.manual_seed(spec.data.split.seed)
            student = opt.distill(
                net, build_model(student_arch), prepared.x_train, prepared.y_train,
                task=str(prepared.task), target_scale=float(arch.get("target_scale", 1.0)),
                seed=spec.data.split.seed,
            )  # fmt: skip
            variants.append(
                opt.Variant(
                    "distilled", student,
                    details={"parameters": opt.count_parameters(student),
                             "teacher_parameters": opt.count_parameters(net)},
                )
            )  # fmt: skip
    return variants, student_arch


def _write_model_dir(
    model_dir: Path, optimized_dir: Path, chosen: opt.Variant, student_arch: dict[str, Any]
) -> None:
    shutil.copytree(model_dir, optimized_dir, dirs_exist_ok=True)
    if chosen.name == "baseline":
        return
    assert chosen.program is not None
    assert chosen.module is not None
    torch.export.save(chosen.program, str(optimized_dir / PROGRAM_FILE))
    if chosen.name == "pruned":
        torch.save(chosen.module.state_dict(), optimized_dir / STATE_FILE)
    elif chosen.name == "distilled":
        write_json(optimized_dir / ARCH_FILE, student_arch)
        torch.save(chosen.module.state_dict(), optimized_dir / STATE_FILE)
        (optimized_dir / HISTORY_FILE).unlink(missing_ok=True)  # the teacher's, not the student's


def _refresh_prediction_reference(
    optimized_dir: Path, chosen: opt.Variant, prepared: Prepared
) -> None:
    """The chosen variant's own prediction histogram in ``model.json``, as the train step
    computes it (``ml/train.py`` ``model_reference``): its outputs on the validation rows, on
    the edges the trained model's reference already uses (shared by every version of the
    model: fixed for classifiers, the trained model's for regression). The feature references
    stay as they are."""
    assert chosen.program is not None
    meta_path = optimized_dir / METADATA_FILE
    meta = json.loads(meta_path.read_text())
    task = str(meta["task"])
    rows = np.asarray(prepared.serving_rows("validation"), dtype=np.float32)
    if not len(rows):
        rows = np.asarray(prepared.serving_rows("train"), dtype=np.float32)
    with torch.inference_mode():
        out = chosen.program.module()(torch.from_numpy(rows)).float()
        out = torch.softmax(out, dim=1) if task == "classification" else out.reshape(-1)
    scores = prediction_score(task, out.numpy().astype(np.float64))
    reference = meta.setdefault("reference", {})
    trained = (reference.get("prediction") or {}).get("edges") or ()
    edges = prediction_edges(task, scores, shared=trained if task != "classification" else ())
    reference["prediction"] = histogram(scores, edges)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")


def _report(metric: str, table: list[opt.Variant], spec: TrainingRunSpec) -> str:
    def ms(value: float) -> str:
        return "n/a" if not math.isfinite(value) else f"{value:.3f}"

    rows = [
        [v.name, "n/a" if not math.isfinite(v.score) else f"{v.score:.4f}",
         ms(v.latency_ms), ms(v.latency_ms_b1), f"{v.size_bytes / 1e6:.3f}",
         f"{v.compressed_bytes / 1e6:.3f}",
         "chosen" if v.chosen else v.status, v.reason]
        for v in table
    ]  # fmt: skip
    o = spec.optimization
    rule = (
        f"<p>Objective: validation {metric}. A variant is kept when its {metric} is at most "
        f"{o.max_accuracy_drop} worse than the baseline's and (int8, distillation) it is at "
        f"least {o.min_speedup}x faster at {SERVING_BATCH} rows, or (pruning) its compressed "
        "program is smaller. Latency: median on one CPU thread of the exported program, "
        "transforms included.</p>"
    )
    header = ["variant", metric, f"latency ms (batch {SERVING_BATCH})", "latency ms (1 row)",
              "size MB", "compressed MB", "outcome", "why"]  # fmt: skip
    return html_page("Optimisation", [("Variants", rule + html_table(header, rows))])


def _skip_for_trees(
    spec: TrainingRunSpec, run_uri: str, model_dir: Path, optimized_dir: Path, report_html: Path
) -> StepResult:
    """The forest as trained, with a reason for every requested variant."""
    o = spec.optimization
    asked = {"pruned": o.pruning > 0, "int8": o.quantize_int8, "distilled": bool(
        o.distill_hidden_layers), "bf16": True}  # fmt: skip
    skipped = {name: TREE_SKIPS[name] for name, wanted in asked.items() if wanted}
    shutil.copytree(model_dir, optimized_dir, dirs_exist_ok=True)
    write_json(
        optimized_dir / OPTIMIZATION_FILE,
        {"chosen": "baseline", "format": "onnx", "variants": [
            {"name": name, "status": "unsupported", "reason": why}
            for name, why in skipped.items()
        ]},
    )  # fmt: skip
    rows = [[name, "unsupported", why] for name, why in skipped.items()]
    report_html.write_text(
        html_page("Optimisation", [("Gradient-boosted trees (ONNX): used as trained",
                                    html_table(["variant", "outcome", "why"], rows))])
    )  # fmt: skip
    if run_uri:
        publish(run_uri, REPORT, report_html)
    return StepResult(
        outputs={"chosen": "baseline", "optimized": False,
                 "variants": {name: f"unsupported: {why}" for name, why in skipped.items()}},
        published={"optimization_report": REPORT} if run_uri else {},
    )  # fmt: skip


def run(
    spec: TrainingRunSpec,
    *,
    report: StepReport,
    run_uri: str,
    prepared_dir: Path,
    model_dir: Path,
    optimized_dir: Path,
    report_html: Path,
) -> StepResult:
    report_html.parent.mkdir(parents=True, exist_ok=True)
    if not requested(spec):
        shutil.copytree(model_dir, optimized_dir, dirs_exist_ok=True)
        report_html.write_text(
            html_page("Optimisation", [("Off", "<p>No optimisation was asked for: the model "
                                               "is used as trained.</p>")])
        )  # fmt: skip
        if run_uri:
            publish(run_uri, REPORT, report_html)
        return StepResult(
            outputs={"chosen": "baseline", "optimized": False},
            published={"optimization_report": REPORT} if run_uri else {},
        )

    if is_tree_model(model_dir):
        return _skip_for_trees(spec, run_uri, model_dir, optimized_dir, report_html)

    report.update(message="loading the trained model", force=True)
    prepared = load_prepared(prepared_dir)
    net, arch = load_trained(model_dir)
    net = net.eval()
    task = str(prepared.task)
    metric = objective_metric(spec, task)

    def serve(network: nn.Module) -> nn.Module:
        return serving_module(network, prepared)

    variants, student_arch = _build_variants(spec, net, arch, prepared, report)
    common: dict[str, Any] = {
        "serve": serve, "rows": prepared.serving_rows("validation"), "y": prepared.y_validation,
        "task": task, "classes": [str(c) for c in prepared.classes], "metric": metric,
        "timed": False,
    }  # fmt: skip
    report.update(message="measuring the trained model", force=True)
    baseline = opt.measure(opt.Variant("baseline", net), **common)
    for variant in variants:
        if variant.status != "unsupported":
            report.update(message=f"measuring the {variant.name} variant", force=True)
            opt.measure(variant, **common)
    report.update(message="timing the variants at the serving batch size", force=True)
    opt.time_variants([baseline, *variants], common["rows"])
    o = spec.optimization
    chosen = opt.choose_variant(
        baseline, variants, o.max_accuracy_drop, o.min_speedup, metric=metric
    )
    table = [baseline, *variants]
    _write_model_dir(model_dir, optimized_dir, chosen, student_arch)
    if chosen.name != "baseline":
        _refresh_prediction_reference(optimized_dir, chosen, prepared)
    summary = {
        "objective": metric,
        "chosen": chosen.name,
        "servingBatch": SERVING_BATCH,
        "variants": [v.row() for v in table],
    }
    write_json(optimized_dir / OPTIMIZATION_FILE, summary)
    report_html.write_text(_report(metric, table, spec))
    if run_uri:
        publish(run_uri, REPORT, report_html)

    metrics: dict[str, float] = {
        "chosen": float(table.index(chosen)),
        "baseline_latency_ms": baseline.latency_ms,
        "chosen_latency_ms": chosen.latency_ms,
    }
    ratio = opt.int8_latency_ratio(baseline, variants)
    if ratio is not None:
        metrics["int8_latency_ratio"] = ratio
        print(f"int8 latency / fp32 latency at batch {SERVING_BATCH}: {ratio:.2f}")
    for v in variants:
        if v.status != "unsupported":
            metrics[f"{v.name}_accuracy_drop"] = v.drop
            metrics[f"{v.name}_speedup"] = v.speedup
    if "sparsity" in (pruned := next((v.details for v in variants if v.name == "pruned"), {})):
        metrics["pruned_sparsity"] = float(pruned["sparsity"])
    return StepResult(
        metrics={k: float(v) for k, v in metrics.items() if math.isfinite(v)},
        outputs={
            "chosen": chosen.name,
            "optimized": chosen.name != "baseline",
            "variants": {v.name: f"{v.status}: {v.reason}" for v in variants},
        },
        published={"optimization_report": REPORT} if run_uri else {},
    )
