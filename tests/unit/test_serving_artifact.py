"""The artifact format: save/load round trip with a real trained torch model, reference buckets,
the runtime's metric bucketing, devices (CPU here; CUDA where there is one) with the bf16
check, and the response cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kubeloop.contract.artifact import METADATA_FILE, PROGRAM_FILE
from kubeloop.contract.reference import CLASSIFIER_EDGES, bucket_index, reference_from_data
from kubeloop.contract.serving_metrics import MISSING
from kubeloop.serving.artifact import ArtifactError, bf16_check, load_model, save_model
from kubeloop.serving.cache import ResponseCache, rows_key
from kubeloop.serving.samples import (
    CLASSES,
    breast_cancer,
    mlp,
    train_tabular_model,
    write_broken_model,
    write_skewed_model,
)

NO_CUDA = "no CUDA device here (torch.cuda.is_available() is False): the GPU path is not run"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tabular_model(tmp_path_factory.mktemp("tabular"))


def test_round_trip_predicts_like_the_in_memory_module(tmp_path: Path) -> None:
    torch.manual_seed(1)
    x, _, names = breast_cancer()
    module = mlp(30, 2).eval()
    mean, scale = x.mean(axis=0), x.std(axis=0)
    save_model(
        tmp_path,
        module,
        task="classification",
        features=names,
        classes=CLASSES,
        mean=mean.tolist(),
        scale=scale.tolist(),
        reference={},
    )
    loaded = load_model(tmp_path)
    for n in (1, 2, 7, 569):  # the batch dimension is dynamic, 1 included
        rows = x[:n]
        with torch.no_grad():
            expected = torch.softmax(module(torch.from_numpy((rows - mean) / scale)), dim=1)
        got = loaded.predict(rows)
        assert got.shape == (n, 2)
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)
    meta = json.loads((tmp_path / METADATA_FILE).read_text())
    assert meta["format"] == "torch-export"
    assert meta["features"] == names
    assert meta["classes"] == CLASSES
    assert loaded.task == "classification"
    assert loaded.features == names


def test_regression_round_trip(tmp_path: Path) -> None:
    module = mlp(3, 1).eval()
    save_model(
        tmp_path, module, task="regression", features=["a", "b", "c"],
        mean=[0.0, 1.0, 2.0], scale=[1.0, 2.0, 4.0], reference={},
    )  # fmt: skip
    rows = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy((rows - [0, 1, 2]) / [1, 2, 4]).float())[:, 0]
    got = load_model(tmp_path).predict(rows)
    assert got.shape == (5,)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_trained_model_is_accurate_and_carries_its_reference(model_dir: Path) -> None:
    x, y, names = breast_cancer()
    loaded = load_model(model_dir)
    accuracy = float((loaded.predict(x).argmax(axis=1) == y).mean())
    assert accuracy > 0.95
    ref = loaded.reference
    assert set(ref["features"]) == set(names)
    radius = ref["features"]["mean_radius"]
    assert len(radius["edges"]) == 11
    assert len(radius["fractions"]) == 11  # 10 buckets, then the missing share
    assert radius["edges"] == sorted(radius["edges"])
    assert radius["edges"][0] == pytest.approx(x[:, 0].min())
    assert radius["edges"][-1] == pytest.approx(x[:, 0].max())
    assert sum(radius["fractions"]) == pytest.approx(1.0)
    assert all(0.05 < f < 0.15 for f in radius["fractions"][:10])  # quantiles: ~10% each
    assert radius["fractions"][10] == 0.0  # the data set has no missing values
    assert ref["prediction"]["edges"] == list(CLASSIFIER_EDGES)
    assert sum(ref["prediction"]["fractions"]) == pytest.approx(1.0)
    assert loaded.modality == "tabular"
    assert loaded.precision["bf16"]["allowed"] is True  # the check ran on the training rows
    assert loaded.precision["bf16"]["agreement"] >= 0.99


def test_reference_buckets_and_bucket_index_agree() -> None:
    values = np.arange(100, dtype=np.float64)
    ref = reference_from_data(values[:, None], ["v"], values / 100, task="regression")
    edges = ref["features"]["v"]["edges"]
    assert edges[0] == 0
    assert edges[-1] == 99
    assert len(edges) == 11
    assert ref["features"]["v"]["fractions"] == pytest.approx([0.1] * 10 + [0.0])
    # out-of-range values fall into the end buckets, NaN into the missing one
    assert bucket_index(edges, [-5.0, 0.0, 50.0, 99.0, 1e9, np.nan]).tolist() == [
        0, 0, 5, 9, 9, 10,
    ]  # fmt: skip
    # a constant feature has one bucket holding everything
    const = reference_from_data(np.ones((10, 1)), ["c"], np.zeros(10), task="regression")
    assert const["features"]["c"] == {"edges": [1.0, 1.0], "fractions": [1.0, 0.0], "rows": 10}
    # binary classification: the prediction reference is the positive-class probability, on
    # the fixed score edges
    probs = np.stack([1 - values / 100, values / 100], axis=1)
    prediction = reference_from_data(values[:, None], ["v"], probs)["prediction"]
    assert prediction["edges"] == list(CLASSIFIER_EDGES)
    assert prediction["fractions"] == pytest.approx([0.1] * 10 + [0.0])


def test_wrong_input_width_is_a_clear_value_error(model_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"expected \[n, 30\]"):
        load_model(model_dir).predict(np.zeros((2, 3), dtype=np.float32))


def test_broken_model_loads_but_fails_inside_the_model(tmp_path: Path) -> None:
    x, _, _ = breast_cancer()
    broken = load_model(write_broken_model(tmp_path))
    assert broken.n_features == 30
    with pytest.raises(Exception, match="12"):
        broken.predict(x[:2])


def test_load_errors_name_the_file(tmp_path: Path, model_dir: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(ArtifactError, match=r"model\.json is missing"):
        load_model(tmp_path)
    meta = json.loads((model_dir / METADATA_FILE).read_text())
    (tmp_path / METADATA_FILE).write_text(json.dumps({**meta, "format": "onnx"}))
    with pytest.raises(ArtifactError, match="format='onnx'"):
        load_model(tmp_path)
    (tmp_path / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"model\.pt2 is missing"):
        load_model(tmp_path)
    (tmp_path / PROGRAM_FILE).write_bytes(b"not a zip")
    with pytest.raises(ArtifactError, match=r"not a torch\.export program"):
        load_model(tmp_path)


def test_cache_is_an_lru_with_ttl() -> None:
    now = [0.0]
    cache = ResponseCache(2, ttl_s=10, clock=lambda: now[0])
    a, b, c = (np.full((1, 3), v, dtype=np.float32) for v in (1, 2, 3))
    assert rows_key(a) != rows_key(b)
    assert rows_key(a) == rows_key(a.copy())
    assert rows_key(np.zeros((1, 4), np.float32)) != rows_key(np.zeros((2, 2), np.float32))
    cache.put(rows_key(a), a * 10)
    cache.put(rows_key(b), b * 10)
    hit = cache.get(rows_key(a))
    assert hit is not None
    assert hit[0, 0] == 10
    assert not hit.flags.writeable
    cache.put(rows_key(c), c * 10)  # evicts b, the least recently used
    assert cache.get(rows_key(b)) is None
    assert cache.get(rows_key(c)) is not None
    now[0] = 10.5  # both expired
    assert cache.get(rows_key(a)) is None
    assert cache.get(rows_key(c)) is None
    assert len(cache) == 0
    assert (cache.hits, cache.misses) == (2, 3)


def test_runtime_metrics_bucket_like_the_reference(model_dir: Path) -> None:
    from kubeloop.serving.metrics import ServingMetrics

    x, _, names = breast_cancer()
    loaded = load_model(model_dir)
    metrics = ServingMetrics("unit", "unit-v1", task="classification", reference=loaded.reference)
    shifted = np.concatenate([x, x * 3, x / 3, -x])  # values beyond the training range too
    shifted[::7, 3] = np.nan  # and missing ones
    want = np.stack(
        [
            bucket_index(loaded.reference["features"][n]["edges"], shifted[:, i])
            for i, n in enumerate(names)
        ],
        axis=1,
    )
    np.testing.assert_array_equal(metrics.feature_buckets(shifted), want)
    assert (metrics.feature_buckets(shifted)[::7, 3] == 10).all()  # the missing bucket, not 0
    assert metrics.feature_buckets(shifted)[::7, 2].tolist() == want[::7, 2].tolist()
    assert MISSING == "missing"


# --- devices and precision ---------------------------------------------------------------------


def test_device_choice_on_a_machine_without_cuda(model_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the CPU-only fallbacks are not observable")
    assert load_model(model_dir, device="auto").device == "cpu"
    assert load_model(model_dir).device == "cpu"
    with pytest.raises(ArtifactError, match=r"device='cuda'.*is_available\(\) is False"):
        load_model(model_dir, device="cuda")
    with pytest.raises(ArtifactError, match="device='tpu'"):
        load_model(model_dir, device="tpu")


def test_bf16_check_refuses_a_model_whose_answers_change(tmp_path: Path) -> None:
    x, _, names = breast_cancer()
    rows = ((x - x.mean(axis=0)) / x.std(axis=0)).astype(np.float32)

    class Knife(torch.nn.Module):
        """Logits that differ by 1e-3 at a scale of 1e3: bf16's 8 bits of mantissa cannot
        tell the classes apart."""

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            big = torch.nn.functional.linear(z[:, :1], torch.ones(2, 1)) * 0 + 1000.0
            return big + torch.nn.functional.linear(z[:, :1], torch.tensor([[1e-3], [0.0]]))

    verdict = bf16_check(Knife(), rows, "classification")
    assert verdict["allowed"] is False
    assert verdict["rows"] == len(rows)
    assert bf16_check(mlp(30, 2).eval(), rows, "classification")["allowed"] is True
    assert bf16_check(mlp(30, 1).eval(), rows, "regression")["allowed"] is True
    # no check rows: the artifact says nothing, so it is served in fp32
    save_model(
        tmp_path, mlp(30, 2), task="classification", features=names, classes=CLASSES,
        mean=[0.0] * 30, scale=[1.0] * 30, reference={},
    )  # fmt: skip
    assert load_model(tmp_path).precision == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_serves_the_same_answers_through_pinned_buffers(model_dir: Path) -> None:
    x, _, _ = breast_cancer()
    cpu = load_model(model_dir)
    gpu = load_model(model_dir, device="cuda")
    assert gpu.device == "cuda"
    assert load_model(model_dir, device="auto").device == "cuda"
    assert next(gpu.module.parameters()).is_cuda
    assert gpu.bf16 == torch.cuda.is_bf16_supported()  # the sample artifact passed the check
    for n in (1, 7, 569, 3):  # buffers grow, then are reused
        got = gpu.predict(x[:n])
        assert got.shape == (n, 2)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, cpu.predict(x[:n]), atol=2e-2 if gpu.bf16 else 1e-5)
    for buffer in (gpu._pinned_in, gpu._pinned_out):
        assert buffer is not None
        assert buffer.is_pinned()
    agreement = (gpu.predict(x).argmax(axis=1) == cpu.predict(x).argmax(axis=1)).mean()
    assert agreement >= 0.99
    skewed = load_model(write_skewed_model(model_dir.parent / "skewed-gpu"), device="cuda")
    assert skewed.predict(x[:4]).shape == (4, 2)
