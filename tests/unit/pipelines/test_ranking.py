"""Ranking metrics against hand-computed values and their edge cases, the group-aware split,
the group column kept out of the features, the built-in ranking dataset, the fit gate, and the
evaluate step ranking a trained model and refusing an over-fitted one."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from kubeloop.api.training_run import FitGate, Split
from kubeloop.serving.artifact import load_model
from kubeloop_pipelines.contract import HISTORY_FILE, SPLITS, StepError, read_json
from kubeloop_pipelines.ml import builtin_datasets, datasets, ranking
from kubeloop_pipelines.ml.evaluate import learning_curve_verdict
from kubeloop_pipelines.ml.fit_gate import check_fit_gate
from kubeloop_pipelines.ml.preprocess import load_prepared
from kubeloop_pipelines.progress import StepReport
from kubeloop_pipelines.steps import evaluate as evaluate_step
from tests.unit.pipelines.conftest import ingest_and_preprocess, make_spec, trained

LOG2_3 = math.log2(3)  # 1.58496: the discount of rank 2

# --- MAP@k and NDCG@k by hand ------------------------------------------------------------

# Group "a", binary relevance. Scores already descending, so the ranked relevances are
# [1, 0, 1, 0].
#   k=3: DCG = (2^1-1)/log2(2) + 0 + (2^1-1)/log2(4) = 1 + 0.5 = 1.5
#        IDCG (ideal [1, 1, 0]) = 1 + 1/log2(3) = 1.63093       → NDCG = 0.91972
#        AP: R = 2 relevant, hits at ranks 1 and 3: (P@1 + P@3) / min(3, 2)
#            = (1 + 2/3) / 2 = 0.83333
# Group "b", graded 0-3. Ranked by score (0.5, 0.3, 0.1) the relevances are [0, 1, 3].
#   k=3: DCG = 0 + (2^1-1)/log2(3) + (2^3-1)/log2(4) = 0.63093 + 3.5 = 4.13093
#        IDCG (ideal [3, 1, 0]) = 7/1 + 1/log2(3) = 7.63093      → NDCG = 0.54134
#        AP: relevant = rel > 0 → hits at ranks 2 and 3: (1/2 + 2/3) / min(3, 2) = 0.58333
# Group "c" has no relevant row: IDCG = 0, neither metric is defined, it is left out.
#   MAP@3 = (0.83333 + 0.58333) / 2 = 0.70833;  NDCG@3 = (0.91972 + 0.54134) / 2 = 0.73053
GROUPS = np.array(["a", "a", "a", "a", "b", "b", "b", "c", "c"])
RELEVANCE = np.array([1, 0, 1, 0, 3, 0, 1, 0, 0], dtype=np.float64)
SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.1, 0.5, 0.3, 0.2, 0.4])
NDCG_A = 1.5 / (1 + 1 / LOG2_3)
NDCG_B = (1 / LOG2_3 + 3.5) / (7 + 1 / LOG2_3)


def test_hand_computed_values_per_group() -> None:
    assert round(NDCG_A, 5) == 0.91972
    assert round(NDCG_B, 5) == 0.54134
    a, b = GROUPS == "a", GROUPS == "b"
    assert ranking.group_ndcg(RELEVANCE[a], SCORES[a], 3) == pytest.approx(NDCG_A)
    assert ranking.group_ndcg(RELEVANCE[b], SCORES[b], 3) == pytest.approx(NDCG_B)
    assert ranking.group_average_precision(RELEVANCE[a], SCORES[a], 3) == pytest.approx(5 / 6)
    assert ranking.group_average_precision(RELEVANCE[b], SCORES[b], 3) == pytest.approx(7 / 12)


def test_means_leave_out_groups_without_relevant_rows() -> None:
    assert ranking.ndcg_at_k(RELEVANCE, SCORES, GROUPS, 3) == pytest.approx((NDCG_A + NDCG_B) / 2)
    assert ranking.map_at_k(RELEVANCE, SCORES, GROUPS, 3) == pytest.approx((5 / 6 + 7 / 12) / 2)
    c = GROUPS == "c"
    assert math.isnan(ranking.group_ndcg(RELEVANCE[c], SCORES[c], 3))
    assert math.isnan(ranking.group_average_precision(RELEVANCE[c], SCORES[c], 3))
    # nothing relevant anywhere: undefined, so left out (a gate on it fails as unmeasurable)
    metrics, details = ranking.ranking_metrics(
        "regression", RELEVANCE[c], SCORES[c], GROUPS[c], classes=[], k=3
    )
    assert metrics == {}
    assert details == {"k": 3, "groups": 1, "groupsWithoutRelevant": 1}


def test_k_larger_than_the_group_and_the_min_k_r_normaliser() -> None:
    a = GROUPS == "a"
    # k=10 > 4 rows: the cut-off counts every row; row 4 (rel 0) adds nothing → as k=3
    assert ranking.group_ndcg(RELEVANCE[a], SCORES[a], 10) == pytest.approx(NDCG_A)
    # AP@10 normalises by min(10, R=2) = 2 → (1 + 2/3) / 2 as before
    assert ranking.group_average_precision(RELEVANCE[a], SCORES[a], 10) == pytest.approx(5 / 6)
    # k=1: the top row is relevant: AP@1 = P@1 / min(1, 2) = 1 (not 1/2 with a /R normaliser)
    assert ranking.group_average_precision(RELEVANCE[a], SCORES[a], 1) == 1.0
    assert ranking.group_ndcg(RELEVANCE[a], SCORES[a], 1) == 1.0


def test_ties_are_broken_pessimistically_whatever_the_row_order() -> None:
    # three tied rows, one relevant: ranked [0, 0, 1] → DCG@3 = 1/log2(4) = 0.5, IDCG = 1;
    # AP@3 = P@3 / min(3, 1) = 1/3
    for relevance in ([1.0, 0.0, 0.0], [0.0, 0.0, 1.0]):
        tied = np.full(3, 0.5)
        assert ranking.group_ndcg(relevance, tied, 3) == pytest.approx(0.5)
        assert ranking.group_average_precision(relevance, tied, 3) == pytest.approx(1 / 3)
    # a tie only among equal scores: the higher score still comes first
    assert ranking.group_ndcg([0.0, 1.0, 0.0], [0.2, 0.9, 0.2], 3) == 1.0


def test_relevance_and_scores_from_model_outputs() -> None:
    # binary: the last class is relevant and its probability ranks
    proba = np.array([[0.9, 0.1], [0.2, 0.8]])
    rel, score = ranking.relevance_and_scores("classification", [0, 1], proba, ["no", "yes"])
    assert rel.tolist() == [0.0, 1.0]
    assert score.tolist() == [0.1, 0.8]
    # numeric grades as classes: the score is the expected grade (0*0.5 + 1*0.2 + 3*0.3 = 1.1)
    proba3 = np.array([[0.5, 0.2, 0.3]])
    rel, score = ranking.relevance_and_scores("classification", [2], proba3, ["0", "1", "3"])
    assert rel.tolist() == [3.0]
    assert score.tolist() == pytest.approx([1.1])
    with pytest.raises(StepError) as words:
        ranking.relevance_and_scores("classification", [0], proba3, ["bad", "ok", "good"])
    assert words.value.field == "data.target"
    with pytest.raises(StepError, match="grades >= 0"):
        ranking.relevance_and_scores("regression", [-1.0, 2.0], [0.1, 0.2], [])


# --- the group-aware split ---------------------------------------------------------------


def _grouped_frame(sizes: list[int]) -> pd.DataFrame:
    ids = np.repeat(np.arange(len(sizes)), sizes)
    return pd.DataFrame({"qid": ids, "x": np.arange(len(ids)), "y": ids % 2})


def _split_of_each_group(parts: dict[str, pd.DataFrame]) -> dict[int, set[str]]:
    where: dict[int, set[str]] = {}
    for name, part in parts.items():
        for qid in part["qid"]:
            where.setdefault(int(qid), set()).add(name)
    return where


def test_group_aware_split_keeps_every_group_whole() -> None:
    sizes = [3 + (i * 7) % 11 for i in range(40)]
    frame = _grouped_frame(sizes)
    settings = Split(validation=0.2, test=0.2, seed=7)
    parts = datasets.split(frame, settings, target="y", task="classification", group_column="qid")
    where = _split_of_each_group(parts)
    assert len(where) == 40
    assert all(len(splits) == 1 for splits in where.values()), where
    assert sum(len(p) for p in parts.values()) == len(frame)
    for name, fraction in (("test", 0.2), ("validation", 0.2), ("train", 0.6)):
        assert len(parts[name]) / len(frame) == pytest.approx(fraction, abs=0.08), name
    again = datasets.split(frame, settings, target="y", task="classification", group_column="qid")
    assert all(parts[n].equals(again[n]) for n in SPLITS)  # seeded
    # without the group column the same rows scatter queries over the splits
    scattered = datasets.split(frame, settings, target="y", task="classification")
    assert any(len(s) > 1 for s in _split_of_each_group(scattered).values())


def test_group_aware_split_edge_cases() -> None:
    # one large group: every split still gets a group, and train keeps the large one
    parts = datasets.split(
        _grouped_frame([1, 1, 100]), Split(), target="y", task="regression", group_column="qid"
    )
    assert {n: len(p) for n, p in parts.items()} == {"train": 100, "validation": 1, "test": 1}
    with pytest.raises(StepError) as few:
        datasets.split(
            _grouped_frame([5, 5]), Split(), target="y", task="regression", group_column="qid"
        )
    assert few.value.field == "data.groupColumn"
    holes = _grouped_frame([4, 4, 4]).astype({"qid": float})
    holes.loc[2, "qid"] = np.nan
    with pytest.raises(StepError, match="empty in 1 row"):
        datasets.split(holes, Split(), target="y", task="regression", group_column="qid")


# --- the built-in dataset and the group column in the pipeline ---------------------------


def test_builtin_ranking_dataset_is_deterministic_with_a_known_relevant_feature() -> None:
    frame = builtin_datasets.load_builtin("ranking", seed=0)
    assert frame.equals(builtin_datasets.load_builtin("ranking", seed=0))
    assert len(frame) == builtin_datasets.RANKING_QUERIES * builtin_datasets.RANKING_DOCS_PER_QUERY
    assert set(frame["relevance"]) == {0, 1, 2, 3}
    rel, groups = frame["relevance"].to_numpy(float), frame["query_id"].to_numpy()
    by_match = ranking.ndcg_at_k(rel, frame["text_match"].to_numpy(), groups, 5)
    by_noise = ranking.ndcg_at_k(rel, frame["popularity"].to_numpy(), groups, 5)
    assert by_match > 0.9
    assert by_noise < 0.6


RANKING_DATA: dict[str, Any] = {
    "uri": "builtin://ranking",
    "target": "relevance",
    "task": "regression",
    "groupColumn": "query_id",
}


def test_group_column_is_kept_beside_the_features_never_as_one(tmp_path: Path) -> None:
    spec = make_spec("builtin://ranking", "relevance", data=RANKING_DATA)
    ingest_and_preprocess(tmp_path, spec)
    schema = read_json(tmp_path / "raw" / "schema.json")
    assert "query_id" not in [f["name"] for f in schema["features"]]
    assert schema["group_column"] == "query_id"
    prepared = load_prepared(tmp_path / "prepared")
    assert "query_id" not in prepared.serving_features
    assert prepared.x_train.shape[1] == 4  # text_match, freshness, popularity, doc_length
    seen: dict[str, str] = {}
    for name in SPLITS:
        ids = prepared.group_ids(name)
        assert ids is not None
        assert len(ids) == len(prepared.arrays(name)[1])
        for qid in set(ids):
            assert seen.setdefault(str(qid), name) == name, f"query {qid} in two splits"
    # without a group column there are no group ids and query_id is an ordinary feature
    plain = make_spec("builtin://ranking", "relevance", data=RANKING_DATA | {"groupColumn": None})
    ingest_and_preprocess(tmp_path / "plain", plain)
    assert load_prepared(tmp_path / "plain" / "prepared").group_ids("test") is None


# --- the fit gate ------------------------------------------------------------------------


def _history(train: list[float], val: list[float], **extra: object) -> dict[str, object]:
    epochs = [
        {"epoch": i + 1, "train_loss": t, "val_loss": v}
        for i, (t, v) in enumerate(zip(train, val, strict=True))
    ]
    return {"epochs": epochs, **extra}


# the histories of test_evaluate.py's verdict tests
OVERFIT = _history(
    list(np.linspace(0.7, 0.05, 20)),
    [0.7 - 0.05 * e for e in range(8)] + [0.35 + 0.03 * e for e in range(12)],
)
DECAY = [0.7 * math.exp(-e / 3) + 0.1 for e in range(20)]
GOOD_FIT = _history(DECAY, [v + 0.03 for v in DECAY])
FLAT = _history([0.69] * 10, [0.69] * 10)


def test_fit_gate_rejects_an_overfit_history_with_the_explanation() -> None:
    verdict = learning_curve_verdict(OVERFIT)
    result = check_fit_gate(FitGate(), verdict)
    assert result["passed"] is False
    assert result["actual"] == "overfit"
    assert result["text"].startswith("fit=overfit ✗ (fitGate rejects overfit: validation loss")
    assert verdict[1] in result["text"]


def test_fit_gate_passes_a_good_fit_and_what_it_does_not_reject() -> None:
    good = check_fit_gate(FitGate(), learning_curve_verdict(GOOD_FIT))
    assert (good["passed"], good["text"]) == (True, "fit=good fit ✓")
    underfit = learning_curve_verdict(FLAT)
    assert underfit[0] == "underfit"
    assert check_fit_gate(FitGate(), underfit)["passed"] is True  # default rejects overfit only
    both = FitGate(reject=["overfit", "underfit"])
    assert check_fit_gate(both, underfit)["passed"] is False
    unjudged = check_fit_gate(FitGate(), None)
    assert unjudged["passed"] is False
    assert "no learning curves" in unjudged["text"]


# --- the evaluate step ------------------------------------------------------------------

SMALL_REGRESSOR: dict[str, Any] = {"epochs": 6, "hiddenLayers": [16], "batchSize": 32}


def run_evaluate(spec: Any, dirs: tuple[Path, Path], tmp: Path) -> dict[str, Any]:
    result = evaluate_step.run(
        spec, report=StepReport("", "evaluate"), run_uri="", prepared_dir=dirs[0],
        model_dir=dirs[1], evaluation_path=tmp / "evaluation.json",
        report_html=tmp / "evaluation.html",
    )  # fmt: skip
    evaluation: dict[str, Any] = json.loads((tmp / "evaluation.json").read_text())
    assert evaluation["gatesPassed"] is result.outputs["gates_passed"]
    return evaluation


@pytest.fixture(scope="module")
def ranking_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    spec = make_spec("builtin://ranking", "relevance", data=RANKING_DATA, model=SMALL_REGRESSOR)
    return trained(tmp_path_factory.mktemp("ranking"), spec)


def test_evaluate_step_ranks_the_test_groups_and_gates_on_ndcg(
    ranking_model: tuple[Path, Path], tmp_path: Path
) -> None:
    gates = [{"metric": "ndcg_at_k", "value": 0.8}, {"metric": "map_at_k", "value": 0.5}]
    spec = make_spec(
        "builtin://ranking", "relevance", data=RANKING_DATA, model=SMALL_REGRESSOR,
        evaluation={"gates": gates, "ranking": {"k": 5}, "fitGate": {"reject": ["overfit"]}},
    )  # fmt: skip
    evaluation = run_evaluate(spec, ranking_model, tmp_path)
    metrics = evaluation["metrics"]
    assert metrics["ndcg_at_k"] > 0.8, metrics
    assert 0 < metrics["map_at_k"] <= 1
    # recomputed from the served predictions: the step ranks what serving would output
    prepared = load_prepared(ranking_model[0])
    served = load_model(ranking_model[1]).predict(prepared.serving_rows("test"))
    groups = prepared.group_ids("test")
    assert groups is not None
    expected = ranking.ndcg_at_k(prepared.y_test, np.asarray(served).reshape(-1), groups, 5)
    assert metrics["ndcg_at_k"] == pytest.approx(expected)
    assert evaluation["ranking"]["k"] == 5
    assert evaluation["ranking"]["groups"] == len(set(groups))
    assert [g["metric"] for g in evaluation["gates"]] == ["ndcg_at_k", "map_at_k", "fit"]
    assert evaluation["gateSummary"].startswith("ndcg_at_k=")


def test_evaluate_step_fit_gate_refuses_an_overfit_model(
    ranking_model: tuple[Path, Path], tmp_path: Path
) -> None:
    # the trained model's own history swapped for an over-fitted one: the gate reads the file
    model_dir = tmp_path / "model"
    shutil.copytree(ranking_model[1], model_dir)
    (model_dir / HISTORY_FILE).write_text(json.dumps(OVERFIT))
    spec = make_spec(
        "builtin://ranking", "relevance", data=RANKING_DATA,
        evaluation={"gates": [{"metric": "ndcg_at_k", "value": 0.1}], "fitGate": {}},
    )  # fmt: skip
    evaluation = run_evaluate(spec, (ranking_model[0], model_dir), tmp_path)
    assert evaluation["gatesPassed"] is False
    assert evaluation["gates"][0]["passed"] is True  # the metric gate alone would register it
    assert evaluation["verdict"]["verdict"] == "overfit"
    assert (
        "fit=overfit ✗ (fitGate rejects overfit: validation loss rose"
        in (evaluation["gateSummary"])
    )
