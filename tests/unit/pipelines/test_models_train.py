"""Model families, imbalance handling and the training loop: every family trains and exports,
early stopping, learning-rate schedules, augmentation, the model directory, and the quality
targets on the built-in datasets (through the real ingest and preprocess steps)."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from kubeloop.api.training_run import (
    Augmentation,
    EarlyStopping,
    Imbalance,
    ModelSpec,
)
from kubeloop_pipelines.contract import StepError
from kubeloop_pipelines.ml.imbalance import FocalLoss, class_weights, resample
from kubeloop_pipelines.ml.models import apply_params, arch_from, build_model
from kubeloop_pipelines.ml.train import fit, predict, score

Arrays = tuple[np.ndarray[Any, Any], ...]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    # Tiny networks: one intra-op thread is fastest, and on a busy 2-core box much faster.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy_data(family: str, task: str = "classification", n: int = 96) -> dict[str, Any]:
    """A small learnable problem for ``family``: the label depends on the inputs."""
    rng = np.random.default_rng(0)
    if family in ("cnn", "resnet"):
        x = rng.normal(size=(n, 1, 8, 8)).astype(np.float32)
        signal = x[:, 0, :4, :].mean(axis=(1, 2)) - x[:, 0, 4:, :].mean(axis=(1, 2))
        shape: tuple[int, ...] = (1, 8, 8)
    elif family == "transformer":
        x = rng.integers(2, 20, size=(n, 12)).astype(np.int64)
        x[:, 8:] = 0  # padding
        signal = (x[:, :8] < 8).sum(axis=1) - 2.5
        shape = (12,)
    else:
        x = rng.normal(size=(n, 6)).astype(np.float32)
        signal = x[:, 0] + 0.5 * x[:, 1]
        shape = (6,)
    if task == "classification":
        y: np.ndarray[Any, Any] = (signal > np.median(signal)).astype(np.int64)
    else:
        y = (100.0 + 30.0 * signal).astype(np.float32)
    return {"x": x, "y": y, "shape": shape, "vocab": 20 if family == "transformer" else 0}


FAMILY_CASES = [
    ("mlp", "classification"),
    ("mlp", "regression"),
    ("cnn", "classification"),
    ("resnet", "classification"),
    ("transformer", "classification"),
    ("transformer", "regression"),
]


@pytest.mark.parametrize(("family", "task"), FAMILY_CASES)
def test_every_family_trains_and_exports_with_a_dynamic_batch(family: str, task: str) -> None:
    data = toy_data(family, task)
    spec = ModelSpec(
        family=family, epochs=3, batch_size=32, embedding_dim=16, heads=2, layers=1,
        channels=[4, 8], early_stopping=None,
    )  # fmt: skip
    n_out = 2 if task == "classification" else 1
    arch = arch_from(spec, {}, input_shape=data["shape"], n_outputs=n_out, vocab_size=data["vocab"])
    x, y = data["x"], data["y"]
    result = fit(arch, x[:64], y[:64], x[64:], y[64:], task=task, model=spec)  # type: ignore[arg-type]
    assert result.epochs_run == 3
    assert all(np.isfinite([h.train_loss, h.val_loss]).all() for h in result.history)
    module = result.module
    if task == "regression":  # the network learns standardised targets, outputs are in units
        assert result.arch["target_scale"] > 1.0
        values = predict(module, x, task)
        assert values.shape == (len(x),)
        assert abs(float(values.mean()) - float(y.mean())) < 3 * float(y.std())
    else:
        probs = predict(module, x, task)
        assert probs.shape == (len(x), 2)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)

    inputs = torch.as_tensor(x[:2]).float()  # serving sends floats, token ids included
    program = torch.export.export(
        module.eval(), (inputs,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
    )
    for batch in (1, 5):
        rows = torch.as_tensor(x[:batch]).float()
        expected = module(rows)
        assert expected.shape == (batch, n_out)
        torch.testing.assert_close(program.module()(rows), expected, rtol=1e-4, atol=1e-4)

    rebuilt = build_model(result.arch)  # the arch alone rebuilds the same network
    rebuilt.load_state_dict(module.state_dict())
    torch.testing.assert_close(rebuilt.eval()(inputs), module(inputs))


def test_transformer_ignores_padding_and_survives_an_empty_row() -> None:
    arch = arch_from(
        ModelSpec(family="transformer", embedding_dim=16, heads=2, layers=1, dropout=0.0),
        {},
        input_shape=(6,),
        n_outputs=2,
        vocab_size=10,
    )
    net = build_model(arch).eval()
    rows = torch.tensor([[3, 4, 5, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    out = net(rows)
    assert torch.isfinite(out).all()
    # What the pad slots hold does not matter: they are masked and left out of the mean.
    changed = rows.clone()
    changed[0, 3:] = 0
    torch.testing.assert_close(net(changed), out)


def test_arch_errors_name_the_field() -> None:
    with pytest.raises(StepError) as caught:
        arch_from(ModelSpec(family="cnn"), {}, input_shape=(30,), n_outputs=2)
    assert caught.value.field == "model.family"
    assert "'cnn'" in caught.value.message
    with pytest.raises(StepError) as caught:
        arch_from(ModelSpec(family="transformer"), {}, input_shape=(1, 8, 8), n_outputs=2)
    assert caught.value.field == "model.family"
    with pytest.raises(StepError) as caught:
        arch_from(
            ModelSpec(family="transformer"), {"embeddingDim": 30, "heads": 4},
            input_shape=(12,), n_outputs=2, vocab_size=50,
        )  # fmt: skip
    assert caught.value.field == "model.heads"
    assert "30" in caught.value.message
    with pytest.raises(StepError) as caught:
        apply_params(ModelSpec(), Imbalance(), {"dropout": 2.0})
    assert caught.value.field == "model.dropout"
    assert "2.0" in caught.value.message
    with pytest.raises(StepError) as caught:
        apply_params(ModelSpec(), Imbalance(), {"momentum": 0.9})
    assert "momentum" in caught.value.message
    assert "learningRate" in caught.value.message


def test_tuned_params_override_the_spec() -> None:
    arch = arch_from(
        ModelSpec(hidden_layers=[8]),
        {"hiddenLayers": "64,32", "model.dropout": 0.3, "batchNorm": "false"},
        input_shape=(5,),
        n_outputs=3,
    )
    assert arch["hidden_layers"] == [64, 32]
    assert arch["dropout"] == 0.3
    assert arch["batch_norm"] is False
    net = build_model(arch)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in net.modules())


# --- imbalance -----------------------------------------------------------------------------


def test_class_weights_are_inverse_frequency() -> None:
    y = np.array([0] * 90 + [1] * 10)
    weights = class_weights(y, 2)
    np.testing.assert_allclose(weights, [100 / (2 * 90), 100 / (2 * 10)], rtol=1e-6)
    assert class_weights(np.array([0, 1, 0, 1]), 2).tolist() == [1.0, 1.0]


@pytest.mark.parametrize(
    ("strategy", "ratio", "expected"),
    [
        ("oversample", 1.0, {0: 90, 1: 90}),
        ("oversample", 0.5, {0: 90, 1: 45}),
        ("smote", 1.0, {0: 90, 1: 90}),
        ("undersample", 1.0, {0: 10, 1: 10}),
        ("undersample", 0.5, {0: 20, 1: 10}),
        ("none", 1.0, {0: 90, 1: 10}),
        ("class_weights", 1.0, {0: 90, 1: 10}),
    ],
)
def test_resampling_reaches_the_target_ratio(
    strategy: str, ratio: float, expected: dict[int, int]
) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 1, 2, 2)).astype(np.float32)  # images keep their shape
    y = np.array([0] * 90 + [1] * 10)
    new_x, new_y = resample(x, y, strategy=strategy, target_ratio=ratio, seed=0)
    counts = dict(zip(*np.unique(new_y, return_counts=True), strict=True))
    assert {int(k): int(v) for k, v in counts.items()} == expected
    assert new_x.shape[1:] == (1, 2, 2)
    assert new_x.dtype == np.float32


def test_smote_refuses_token_ids() -> None:
    x = np.ones((20, 5), dtype=np.int64)
    y = np.array([0] * 15 + [1] * 5)
    with pytest.raises(StepError) as caught:
        resample(x, y, strategy="smote", modality="text")
    assert caught.value.field == "imbalance.strategy"
    assert "oversample" in caught.value.message


def test_focal_loss() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(16, 3), torch.randint(0, 3, (16,))
    # gamma 0 is cross-entropy, with and without class weights
    torch.testing.assert_close(
        FocalLoss(0.0)(logits, target), nn.functional.cross_entropy(logits, target)
    )
    weights = torch.tensor([1.0, 2.0, 5.0])
    torch.testing.assert_close(
        FocalLoss(0.0, weights)(logits, target),
        nn.functional.cross_entropy(logits, target, weight=weights),
    )
    # focusing down-weights confident rows: an easy row loses more loss than a hard one
    easy, hard = torch.tensor([[4.0, 0.0]]), torch.tensor([[0.0, 0.5]])
    label = torch.tensor([0])
    ratio_easy = FocalLoss(2.0)(easy, label) / FocalLoss(0.0)(easy, label)
    ratio_hard = FocalLoss(2.0)(hard, label) / FocalLoss(0.0)(hard, label)
    assert ratio_easy < 0.01 < ratio_hard


# --- the training loop ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cancer() -> Arrays:
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    x, y = load_breast_cancer(return_X_y=True)
    xtr, xva, ytr, yva = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    mean, std = xtr.mean(axis=0), xtr.std(axis=0)
    return (
        ((xtr - mean) / std).astype(np.float32),
        ytr.astype(np.int64),
        ((xva - mean) / std).astype(np.float32),
        yva.astype(np.int64),
    )


def cancer_fit(data: Arrays, model: ModelSpec, **kwargs: Any) -> Any:
    arch = arch_from(model, {}, input_shape=(30,), n_outputs=2)
    return fit(arch, *data, task="classification", model=model, **kwargs)


def test_early_stopping_stops_and_restores_the_best_weights(cancer: Arrays) -> None:
    # A wide net at a high learning rate overfits 400 rows within a few epochs.
    model = ModelSpec(
        hidden_layers=[256, 256], dropout=0.0, learning_rate=0.01, epochs=60, batch_size=32,
        lr_schedule="none", early_stopping=EarlyStopping(patience=3),
    )  # fmt: skip
    result = cancer_fit(cancer, model)
    losses = [h.val_loss for h in result.history]
    assert result.stopped_early
    assert result.epochs_run < 60
    assert result.epochs_run == result.best_epoch + 3  # patience epochs without improvement
    assert result.best_epoch == int(np.argmin(losses)) + 1
    # the module holds the best epoch's weights: its validation loss is the best one
    probs = predict(result.module, cancer[2], "classification")
    val_loss = float(
        nn.functional.nll_loss(torch.log(torch.from_numpy(probs)), torch.from_numpy(cancer[3]))
    )
    assert val_loss == pytest.approx(min(losses), rel=1e-4)
    assert result.val_metric == result.history[result.best_epoch - 1].val_metric

    without = cancer_fit(cancer, model.model_copy(update={"early_stopping": None, "epochs": 8}))
    assert without.epochs_run == 8
    assert without.best_epoch == 8
    assert not without.stopped_early


@pytest.mark.parametrize("schedule", ["none", "cosine", "step", "plateau"])
def test_lr_schedules_change_the_learning_rate(schedule: str, cancer: Arrays) -> None:
    model = ModelSpec(
        epochs=9, learning_rate=0.01, lr_schedule=schedule, batch_size=128,
        early_stopping=EarlyStopping(patience=2) if schedule == "plateau" else None,
        hidden_layers=[256, 256], dropout=0.0,
    )  # fmt: skip
    result = cancer_fit(cancer, model)
    lrs = [h.lr for h in result.history]
    assert lrs[0] == pytest.approx(0.01)
    if schedule == "none":
        assert set(lrs) == {0.01}
    elif schedule == "cosine":
        assert all(a > b for a, b in itertools.pairwise(lrs))
        assert lrs[-1] < 0.001
    elif schedule == "step":  # x0.1 every epochs // 3
        assert lrs == pytest.approx([0.01] * 3 + [0.001] * 3 + [0.0001] * 3)
    else:  # plateau halves the rate once the validation loss stops falling
        assert min(lrs) < 0.01
        assert lrs == sorted(lrs, reverse=True)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_optimizers_learn(optimizer: str, cancer: Arrays) -> None:
    model = ModelSpec(optimizer=optimizer, learning_rate=0.01, epochs=5, early_stopping=None)
    result = cancer_fit(cancer, model, metric="accuracy")
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.val_metric > 0.9


def test_training_is_seeded(cancer: Arrays) -> None:
    model = ModelSpec(epochs=3, early_stopping=None)
    first, second = cancer_fit(cancer, model, seed=3), cancer_fit(cancer, model, seed=3)
    other = cancer_fit(cancer, model, seed=4)
    assert [h.val_loss for h in first.history] == [h.val_loss for h in second.history]
    assert [h.val_loss for h in first.history] != [h.val_loss for h in other.history]


def test_callback_sees_every_epoch_and_can_stop_training(cancer: Arrays) -> None:
    seen: list[int] = []

    class Stop(Exception):
        pass

    def callback(stats: Any) -> None:
        seen.append(stats.epoch)
        if stats.epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        cancer_fit(cancer, ModelSpec(epochs=5, early_stopping=None), callback=callback)
    assert seen == [1, 2]


def test_augmentation_hook_runs_on_every_training_batch(
    cancer: Arrays, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubeloop_pipelines.ml import augment

    calls: list[tuple[int, str]] = []
    real = augment.augment_batch

    def spy(x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        calls.append((len(x), kwargs["modality"]))
        out: torch.Tensor = real(x, **kwargs)
        return out

    monkeypatch.setattr(augment, "augment_batch", spy)
    model = ModelSpec(epochs=2, batch_size=100, early_stopping=None)
    cancer_fit(cancer, model, augmentation=Augmentation(tabular_noise=0.1))
    assert len(calls) == 2 * 4
    assert {m for _, m in calls} == {"tabular"}  # 398 rows / 100
    calls.clear()
    cancer_fit(cancer, model, augmentation=Augmentation(flip=True))  # images only: not tabular
    assert calls == []


def test_score_matches_the_evaluation_conventions() -> None:
    y = np.array([0, 0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7], [0.6, 0.4]])
    assert score("accuracy", "classification", y, probs) == pytest.approx(0.6)
    assert score("recall", "classification", y, probs) == pytest.approx(0.5)
    assert score("minority_recall", "classification", y, probs) == pytest.approx(0.5)
    assert score("rmse", "regression", np.array([1.0, 3.0]), np.array([2.0, 2.0])) == 1.0
    with pytest.raises(StepError):
        score("f1", "regression", y, probs)
