"""LIME, partial dependence / ICE, counterfactuals and the report (ml/lime_explain.py, ml/pdp.py,
ml/counterfactuals.py, ml/report.py), on synthetic data where one feature decides, and the
explain step writing the report that the register step links."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from pydantic import ValidationError
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression

from kubeloop.api.training_run import TrainingRunSpec
from kubeloop_pipelines.ml import counterfactuals as cf
from kubeloop_pipelines.ml import lime_explain as lx
from kubeloop_pipelines.ml import pdp
from kubeloop_pipelines.ml.report import REPORT_FILE
from kubeloop_pipelines.ml.text import encode_texts
from kubeloop_pipelines.steps import register
from tests.unit.pipelines.conftest import spec_for
from tests.unit.pipelines.test_explain_optimize import run_explain

FEATURES = ["decisive", "noise_a", "noise_b", "noise_c"]
CLASSES = ["no", "yes"]


@pytest.fixture(scope="module")
def table() -> dict[str, Any]:
    """y = 1 exactly when the first feature is positive; the other three are noise."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(800, 4)).astype(np.float32)
    x[:, 2] = x[:, 2] * 5 + 10  # another scale and offset: the search must standardise
    y = (x[:, 0] > 0).astype(np.int64)
    model = LogisticRegression(C=100.0, max_iter=2000).fit(x, y)

    def predict(rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return np.asarray(model.predict_proba(np.asarray(rows, dtype=np.float64)), dtype=np.float32)

    return {"x": x, "y": y, "predict": predict, "test": x[600:]}


def test_lime_ranks_the_decisive_feature_first(table: dict[str, Any]) -> None:
    rows = table["test"][:4]
    found = lx.lime_tabular(
        table["predict"], table["x"][:600], rows, features=FEATURES, task="classification",
        classes=CLASSES, num_samples=500,
    )  # fmt: skip
    assert len(found) == 4
    for item, row in zip(found, rows, strict=True):
        assert item.features[0] == 0, item.weights
        assert "decisive" in item.weights[0][0]
        assert item.prediction == CLASSES[int(row[0] > 0)]
        # the explained class is the predicted one, so its decisive condition pushes towards it
        assert item.weights[0][1] > 0


def test_pdp_is_monotone_in_the_decisive_feature_and_flat_in_noise(table: dict[str, Any]) -> None:
    curves = pdp.dependence_curves(
        table["predict"], table["test"], table["x"], features=FEATURES, chosen=[0, 3],
        task="classification", classes=CLASSES,
    )  # fmt: skip
    decisive, noise = curves
    assert decisive.feature == "decisive"
    assert decisive.output == "P(yes)"
    assert decisive.ice.shape == (len(table["test"]), len(decisive.grid))
    assert np.all(np.diff(decisive.average) >= -1e-6)
    assert decisive.average[-1] - decisive.average[0] > 0.8
    assert np.ptp(noise.average) < 0.05
    # the grid stays within the training range
    assert decisive.grid[0] >= table["x"][:, 0].min()
    assert decisive.grid[-1] <= table["x"][:, 0].max()
    assert pdp.plot_dependence(curves).startswith(b"\x89PNG")


def test_counterfactual_flips_by_changing_the_decisive_feature(table: dict[str, Any]) -> None:
    limits = cf.SearchLimits.from_training(table["x"], candidates=[2, 0, 1], max_changed=2)
    for index, row in enumerate(table["test"][:5]):
        found = cf.find_counterfactual(
            table["predict"], row, limits, features=FEATURES, classes=CLASSES, index=index
        )
        assert found.found, found
        assert found.changed_row is not None
        original = int(np.argmax(table["predict"](row[None])[0]))
        flipped = int(np.argmax(table["predict"](found.changed_row[None])[0]))
        assert found.original_class == CLASSES[original]
        assert flipped != original
        assert found.new_class == CLASSES[flipped]
        changed = [name for name, _, _ in found.changes]
        assert "decisive" in changed
        assert len(changed) <= 2
        assert set(changed) <= {FEATURES[j] for j in limits.candidates}
        for name, _, new in found.changes:
            j = FEATURES.index(name)
            assert limits.low[j] <= new <= limits.high[j]
        cost = np.abs((found.changed_row - row) / limits.scale).sum()
        assert found.cost == pytest.approx(cost, rel=1e-4)
        # bisected to the boundary: no further than needed to cross 0 (plus the row's |x0|)
        assert abs(found.changed_row[0]) < 0.2


def test_counterfactual_outside_the_limits_is_reported_not_found(table: dict[str, Any]) -> None:
    """Only noise features may change: no flip, and the search says so."""
    limits = cf.SearchLimits.from_training(table["x"], candidates=[1, 2, 3], max_changed=3)
    row = table["test"][np.argmax(np.abs(table["test"][:, 0]))]  # far from the boundary
    found = cf.find_counterfactual(table["predict"], row, limits, features=FEATURES,
                                   classes=CLASSES)  # fmt: skip
    assert not found.found
    assert found.new_class is None
    assert found.changes == []


def test_text_lime_picks_the_keyword() -> None:
    rng = np.random.default_rng(1)
    filler = [
        "the",
        "order",
        "arrived",
        "late",
        "please",
        "help",
        "me",
        "with",
        "my",
        "account",
        "today",
        "thanks",
    ]
    texts, labels = [], []
    for i in range(300):
        words = list(rng.choice(filler, size=6))
        if i % 2:
            words.insert(int(rng.integers(0, 6)), "refund")
        texts.append(" ".join(words))
        labels.append(i % 2)
    vectorizer = CountVectorizer().fit(texts)
    model = LogisticRegression(max_iter=1000).fit(vectorizer.transform(texts), labels)

    def on_texts(batch: list[str]) -> npt.NDArray[np.float32]:
        return np.asarray(model.predict_proba(vectorizer.transform(batch)), dtype=np.float32)

    chosen = [t for t, y in zip(texts, labels, strict=True) if y == 1][:3]
    found = lx.lime_text(on_texts, chosen, task="classification", classes=CLASSES,
                         num_samples=300)  # fmt: skip
    for item in found:
        assert item.weights[0][0] == "refund", item.weights
        assert item.prediction == "yes"
        assert item.weights[0][1] > 0


def test_token_ids_decode_to_text_that_encodes_back() -> None:
    vocabulary = ["<pad>", "<unk>", "refund", "please", "now"]
    ids = encode_texts(["please refund zebra now"], vocabulary, 8)[0]
    text = lx.decode_tokens(ids, vocabulary)
    assert text == f"please refund {lx.UNKNOWN_WORD} now"
    assert (encode_texts([text], vocabulary, 8)[0] == ids).all()


def test_spec_refuses_counterfactuals_for_regression_and_extras_without_a_method() -> None:
    base = {"data": {"uri": "builtin://diabetes", "target": "target"},
            "registration": {"modelName": "m"}}  # fmt: skip
    with pytest.raises(ValidationError, match=r"counterfactuals .*classification"):
        TrainingRunSpec.model_validate(
            {**base, "data": {**base["data"], "task": "regression"},
             "explanation": {"counterfactuals": True}}
        )  # fmt: skip
    with pytest.raises(ValidationError, match="lime, partialDependence run in the explain step"):
        TrainingRunSpec.model_validate(
            {**base, "explanation": {"method": "none", "lime": True, "partialDependence": True}}
        )
    spec = TrainingRunSpec.model_validate(
        {**base, "explanation": {"lime": True, "counterfactuals": True, "localRows": 3}}
    )
    assert spec.explanation.local_rows == 3


def test_explain_step_writes_the_report_and_register_links_it(
    cancer_model: tuple[Path, Path], tmp_path: Path
) -> None:
    spec = spec_for(
        "builtin://breast-cancer", "label",
        explanation={"method": "permutation", "samples": 20, "lime": True,
                     "partialDependence": True, "counterfactuals": True, "localRows": 2},
    )  # fmt: skip
    run_dir = tmp_path / "run"
    (run_dir).mkdir()
    evaluation = {"metrics": {"accuracy": 0.95}, "gates": [], "gatesPassed": True,
                  "gateSummary": "no gates", "verdict": {"verdict": "good fit",
                  "explanation": "both losses fell"},
                  "confusion": {"labels": ["0", "1"], "matrix": [[40, 3], [2, 70]]}}  # fmt: skip
    (run_dir / "evaluation.json").write_text(json.dumps(evaluation))
    result = run_explain(spec, cancer_model, tmp_path)
    assert result.published["report"] == REPORT_FILE
    page = (run_dir / REPORT_FILE).read_text()
    headings = (
        "Metrics (test split)",
        "Confusion matrix",
        "Learning curves and verdict",
        "Feature importance (permutation)",
        "Partial dependence and ICE",
        "Local explanations (LIME)",
        "Counterfactuals",
        "Optimisation decisions",
    )
    for heading in headings:
        assert f"<h2>{heading}</h2>" in page, heading
    assert "good fit" in page
    assert page.count("data:image/png;base64,") >= 4
    assert "http://" not in page
    assert "https://" not in page

    uri = register.report_uri(spec, f"file://{run_dir}")
    assert uri == f"file://{run_dir}/{REPORT_FILE}"
    assert register.report_uri(spec, f"file://{tmp_path}/elsewhere") is None
    assert register.report_uri(spec, "") is None
