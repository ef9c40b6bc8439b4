"""Explanations and post-training optimisation on small real models: the feature that decides
the label ranks first, Grad-CAM maps have the image's shape, pruning reaches its sparsity, int8
is measured as served, the budget rule keeps and rejects, and distillation shrinks the model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from kubeloop.api.training_run import TrainingRunSpec
from kubeloop.contract.reference import CLASSIFIER_EDGES, histogram, prediction_score
from kubeloop.serving.artifact import load_model
from kubeloop.serving.samples import Standardise
from kubeloop_pipelines.contract import StepError, StepResult
from kubeloop_pipelines.ml import explain as ex
from kubeloop_pipelines.ml import optimize as opt
from kubeloop_pipelines.ml.models import build_model
from kubeloop_pipelines.ml.preprocess import load_prepared
from kubeloop_pipelines.ml.train import load_trained, predict, serving_module
from kubeloop_pipelines.progress import StepReport
from kubeloop_pipelines.steps import explain as explain_step
from kubeloop_pipelines.steps import optimize as optimize_step
from tests.unit.pipelines.conftest import spec_for, trained

FEATURES = ["f0", "f1", "decisive", "f3", "f4"]
RAW_SCALE = np.array([1.0, 10.0, 100.0, 0.1, 5.0], dtype=np.float32)
RAW_SHIFT = np.array([0.0, 50.0, -20.0, 3.0, 1.0], dtype=np.float32)
CLASSES = ["neg", "pos"]


def _train(net: nn.Module, x: np.ndarray[Any, Any], y: np.ndarray[Any, Any], steps: int) -> None:
    torch.manual_seed(0)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    net.train()
    for _ in range(steps):
        optimiser.zero_grad()
        nn.functional.cross_entropy(net(xt), yt).backward()  # type: ignore[no-untyped-call]
        optimiser.step()
    net.eval()


@pytest.fixture(scope="module")
def toy() -> dict[str, Any]:
    """An MLP trained where only the feature ``decisive`` decides the label."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(600, 5)).astype(np.float32)
    y = (z[:, 2] > 0).astype(np.int64)
    raw = z * RAW_SCALE + RAW_SHIFT
    arch = {"family": "mlp", "input_shape": [5], "n_outputs": 2, "hidden_layers": [64, 64],
            "dropout": 0.0, "batch_norm": False}  # fmt: skip
    torch.manual_seed(0)
    net = build_model(arch)
    _train(net, z[:400], y[:400], 300)
    transform = Standardise(raw[:400].mean(axis=0), raw[:400].std(axis=0))
    return {"arch": arch, "net": net, "transform": transform, "raw": raw, "z": z, "y": y}


def _serving(toy: dict[str, Any]) -> nn.Module:
    return nn.Sequential(toy["transform"], toy["net"]).eval()


# --- explanations ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["permutation", "shap", "integrated_gradients"])
def test_the_decisive_feature_ranks_first(toy: dict[str, Any], method: str) -> None:
    result = ex.explain(
        _serving(toy), method=method, task="classification", features=FEATURES, classes=CLASSES,
        rows=toy["raw"][400:], y=toy["y"][400:], background=toy["raw"][:400], samples=20,
    )  # fmt: skip
    ranking = result.ranking()
    assert ranking[0][0] == "decisive"
    assert ranking[0][1] > 3 * ranking[1][1]
    assert result.sample_attributions.shape == (20, 5)
    assert result.sample_labels[0] in CLASSES
    assert ex.plot_importance(result).startswith(b"\x89PNG")
    assert ex.plot_samples(result).startswith(b"\x89PNG")
    assert "decisive" in ex.top_contributions(result)[0][2]


def test_gradcam_maps_have_the_image_shape() -> None:
    torch.manual_seed(0)
    arch = {"family": "cnn", "input_shape": [1, 8, 8], "n_outputs": 3, "channels": [4, 8],
            "dropout": 0.0, "batch_norm": True}  # fmt: skip
    net = build_model(arch).eval()
    model = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), net).eval()  # serving rows are flat
    rows = np.random.default_rng(1).uniform(0, 16, size=(6, 64)).astype(np.float32)
    layer = ex.last_conv(net)
    assert layer is not None
    maps = ex.gradcam(model, layer, rows, image_shape=(1, 8, 8), target=torch.zeros(6).long())
    assert maps.shape == (6, 8, 8)
    assert maps.min() >= 0
    assert maps.max() <= 1 + 1e-6
    result = ex.explain(
        model, method="gradcam", task="classification", features=[f"px_{i}" for i in range(64)],
        classes=["a", "b", "c"], rows=rows, y=np.zeros(6, dtype=np.int64), background=rows,
        samples=4, modality="image", image_shape=(1, 8, 8), conv_layer=layer,
    )  # fmt: skip
    assert result.heatmaps is not None
    assert result.heatmaps.shape == (4, 8, 8)
    assert result.importance.shape == (64,)
    assert ex.plot_heatmaps(result, (1, 8, 8)).startswith(b"\x89PNG")


def test_text_attributions_are_per_token() -> None:
    torch.manual_seed(0)
    arch = {"family": "transformer", "input_shape": [6], "n_outputs": 2, "vocab_size": 12,
            "embedding_dim": 16, "heads": 2, "layers": 1, "dropout": 0.0}  # fmt: skip
    net = build_model(arch).eval()
    rows = np.array([[3, 4, 5, 0, 0, 0], [7, 8, 9, 10, 11, 0]], dtype=np.float32)
    vocabulary = ["<pad>", "<unk>", *[f"w{i}" for i in range(2, 12)]]
    for method in ("integrated_gradients", "permutation", "shap"):
        result = ex.explain(
            net, method=method, task="classification", features=[f"t{i}" for i in range(6)],
            classes=CLASSES, rows=rows, y=np.array([0, 1]), background=rows, samples=2,
            modality="text", embedding=ex.token_embedding(net), vocabulary=vocabulary,
        )  # fmt: skip
        assert result.sample_attributions.shape == (2, 6)
        assert np.all(result.sample_attributions[0, 3:] == 0)  # padding gets nothing
        assert result.features[int(np.argmax(result.importance))] != "<pad>"
        assert result.sample_tokens is not None
        assert result.sample_tokens[0][0] == "w3"


# --- optimisation ------------------------------------------------------------------------


def test_pruning_reaches_the_requested_sparsity(toy: dict[str, Any]) -> None:
    pruned, achieved = opt.prune_magnitude(toy["net"], 0.6)
    assert achieved == pytest.approx(0.6, abs=1e-3)
    weights = [m.weight for m in pruned.modules() if isinstance(m, nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.6, abs=1e-3)
    assert not any("weight_orig" in k for k in pruned.state_dict())  # made permanent
    assert all((m.weight != 0).all() for m in toy["net"].modules() if isinstance(m, nn.Linear))


def test_int8_variant_is_measured_as_served(toy: dict[str, Any]) -> None:
    common: dict[str, Any] = {
        "serve": lambda net: nn.Sequential(toy["transform"], net),
        "rows": toy["raw"][400:], "y": toy["y"][400:], "task": "classification",
        "classes": CLASSES, "metric": "accuracy", "repeats": 10,
    }  # fmt: skip
    baseline = opt.measure(opt.Variant("baseline", toy["net"]), **common)
    int8 = opt.measure(opt.Variant("int8", opt.quantize_int8(toy["net"])), **common)
    assert int8.exportable, int8.details
    assert int8.program is not None
    # Decomposed to aten: the serving image needs no torchao to load the program.
    assert "torchao" not in int8.program.graph_module.code
    assert abs(int8.score - baseline.score) < 0.03
    assert int8.latency_ms > 0
    assert int8.latency_ms_b1 > 0
    assert int8.size_bytes > 0
    ratio = opt.int8_latency_ratio(baseline, [int8])
    assert ratio is not None
    assert ratio > 0


def _variant(name: str, score: float, latency: float, size: int = 1000) -> opt.Variant:
    return opt.Variant(name, None, score=score, latency_ms=latency, compressed_bytes=size)


def test_budget_rule_keeps_and_rejects_on_synthetic_numbers() -> None:
    baseline = _variant("baseline", 0.950, 10.0)
    fast_int8 = _variant("int8", 0.947, 5.0)  # -0.3 points, 2x: kept
    lossy = _variant("int8", 0.940, 2.0)  # -1 point: rejected however fast
    slow_student = _variant("distilled", 0.951, 8.0)  # 1.25x < 1.5x: rejected
    pruned = _variant("pruned", 0.948, 10.0, size=600)  # within budget and smaller: kept
    big_pruned = _variant("pruned", 0.950, 9.0, size=1000)  # not smaller: rejected
    broken = _variant("distilled", 0.950, 1.0)
    broken.exportable, broken.details["export_error"] = False, "Unsupported: data-dependent"
    unsupported = _variant("int8", math.nan, math.nan)
    unsupported.status = "unsupported"
    variants = [fast_int8, lossy, slow_student, pruned, big_pruned, broken, unsupported]
    chosen = opt.choose_variant(baseline, variants, 0.005, 1.5)
    assert chosen is fast_int8
    assert chosen.chosen
    assert [v.status for v in variants] == [
        "kept", "rejected", "rejected", "kept", "rejected", "rejected", "unsupported",
    ]  # fmt: skip
    assert "exceeds the budget" in lossy.reason
    assert "1.25x < 1.5x" in slow_student.reason
    assert "not smaller" in big_pruned.reason
    assert "cannot be exported" in broken.reason
    # Nothing kept: the baseline stays; lower-is-better metrics drop the other way.
    base_rmse = _variant("baseline", 10.0, 10.0)
    assert opt.choose_variant(
        base_rmse, [_variant("int8", 10.2, 2.0)], 0.1, 1.5, metric="rmse"
    ) is (base_rmse)
    assert opt.choose_variant(_variant("baseline", 0.9, 10.0), [pruned], 0.1, 1.5) is pruned


def test_distillation_gives_a_smaller_working_student(toy: dict[str, Any]) -> None:
    student = build_model({**toy["arch"], "hidden_layers": [8]})
    student = opt.distill(
        toy["net"], student, toy["z"][:400], toy["y"][:400], task="classification"
    )
    assert opt.count_parameters(student) < opt.count_parameters(toy["net"]) / 10
    with torch.no_grad():
        predicted = student(torch.as_tensor(toy["z"][400:])).argmax(dim=1).numpy()
    assert np.mean(predicted == toy["y"][400:]) > 0.9


# --- the steps, end to end ---------------------------------------------------------------


def run_explain(spec: TrainingRunSpec, dirs: tuple[Path, Path], tmp: Path) -> StepResult:
    return explain_step.run(
        spec, report=StepReport("", "explain"), run_uri=f"file://{tmp}/run",
        prepared_dir=dirs[0], model_dir=dirs[1], report_html=tmp / "explanation.html",
    )  # fmt: skip


def run_optimize(spec: TrainingRunSpec, dirs: tuple[Path, Path], tmp: Path) -> StepResult:
    return optimize_step.run(
        spec, report=StepReport("", "optimize"), run_uri=f"file://{tmp}/run",
        prepared_dir=dirs[0], model_dir=dirs[1], optimized_dir=tmp / "optimized",
        report_html=tmp / "optimization.html",
    )  # fmt: skip


def test_explain_step_publishes_importances(
    cancer_model: tuple[Path, Path], tmp_path: Path
) -> None:
    spec = spec_for("builtin://breast-cancer", "label", explanation={"method": "shap",
                                                                     "samples": 20})  # fmt: skip
    result = run_explain(spec, cancer_model, tmp_path)
    assert len(result.metrics) == 5
    assert all(name.startswith("importance_") for name in result.metrics)
    features = load_prepared(cancer_model[0]).serving_features
    assert set(result.outputs["top_features"]) <= set(features)
    for name in result.published.values():
        assert (tmp_path / "run" / name).is_file(), name
    assert "plot_explanation_samples" in result.published
    assert "data:image/png;base64," in (tmp_path / "explanation.html").read_text()


def test_explain_step_none_and_gradcam_without_convolutions(
    cancer_model: tuple[Path, Path], tmp_path: Path
) -> None:
    none = spec_for("builtin://breast-cancer", "label", explanation={"method": "none"})
    result = run_explain(none, cancer_model, tmp_path)
    assert result.metrics == {}
    assert "method: none" in (tmp_path / "explanation.html").read_text()
    gradcam = spec_for("builtin://breast-cancer", "label", explanation={"method": "gradcam"})
    with pytest.raises(StepError) as caught:
        run_explain(gradcam, cancer_model, tmp_path)
    assert caught.value.field == "explanation.method"
    assert "'mlp'" in caught.value.message
    assert "permutation" in caught.value.message


def test_explain_step_gradcam_on_digits(tmp_path: Path) -> None:
    spec = spec_for(
        "builtin://digits", "digit", model={"family": "cnn", "channels": [4, 8], "epochs": 2},
        explanation={"method": "gradcam", "samples": 8},
    )  # fmt: skip
    dirs = trained(tmp_path, spec)
    result = run_explain(spec, dirs, tmp_path)
    assert "plot_explanation_heatmaps" in result.published
    assert all(name.startswith("importance_px_") for name in result.metrics)


def test_optimize_step_copies_when_nothing_is_asked(
    cancer_model: tuple[Path, Path], tmp_path: Path
) -> None:
    result = run_optimize(spec_for("builtin://breast-cancer", "label"), cancer_model, tmp_path)
    assert result.outputs == {"chosen": "baseline", "optimized": False}
    original = {p.name: p.read_bytes() for p in cancer_model[1].iterdir()}
    assert {p.name: p.read_bytes() for p in (tmp_path / "optimized").iterdir()} == original


def test_optimize_step_measures_variants_and_writes_the_chosen_one(
    cancer_model: tuple[Path, Path], tmp_path: Path
) -> None:
    spec = spec_for(
        "builtin://breast-cancer", "label",
        optimization={"pruning": 0.5, "quantizeInt8": True, "distillHiddenLayers": [8],
                      "maxAccuracyDrop": 0.05, "minSpeedup": 1.0},
    )  # fmt: skip
    result = run_optimize(spec, cancer_model, tmp_path)
    optimized = tmp_path / "optimized"
    summary = json.loads((optimized / "optimization.json").read_text())
    assert [v["name"] for v in summary["variants"]] == ["baseline", "pruned", "int8", "distilled"]
    assert all(v["status"] in ("baseline", "kept", "rejected") for v in summary["variants"])
    assert summary["variants"][1]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert result.metrics["int8_latency_ratio"] > 0
    assert result.metrics["chosen"] == [v["chosen"] for v in summary["variants"]].index(True)
    chosen = result.outputs["chosen"]
    assert chosen == summary["chosen"]
    # A complete model directory: serving artifact and eager network agree.
    prepared = load_prepared(cancer_model[0])
    served = load_model(optimized).predict(prepared.serving_rows("test"))
    net, arch = load_trained(optimized)
    eager = predict(serving_module(net, prepared), prepared.serving_rows("test"), "classification")
    if chosen == "int8":  # the eager network is the fp32 one it was quantised from
        assert np.mean(served.argmax(1) == eager.argmax(1)) > 0.95
    else:
        np.testing.assert_allclose(served, eager, atol=1e-5)
    if chosen == "distilled":
        assert arch["hidden_layers"] == [8]
    # model.json's prediction reference is the chosen program's, on the validation rows and
    # the classifier's fixed edges (what the drift and canary checks compare traffic with)
    reference = json.loads((optimized / "model.json").read_text())["reference"]["prediction"]
    validation_rows = prepared.serving_rows("validation")
    scores = prediction_score("classification", load_model(optimized).predict(validation_rows))
    assert reference["edges"] == list(CLASSIFIER_EDGES)
    assert reference["fractions"] == pytest.approx(
        histogram(scores, CLASSIFIER_EDGES)["fractions"], abs=1.5 / len(validation_rows)
    )
    assert (tmp_path / "run" / "reports" / "optimization.html").is_file()
    assert "distilled" in (tmp_path / "optimization.html").read_text()
