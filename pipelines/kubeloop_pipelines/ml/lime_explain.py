"""LIME local explanations (the ``lime`` package) of a few held-out rows, through ``predict``.

LIME perturbs one row (tables: features drawn around the training distribution and
discretised into quartiles; text: words removed), asks the model, and fits a linear model
weighted by closeness to the row; its coefficients say which conditions ("worst radius >
16.8", the word "refund") pushed this prediction. Classification explains the predicted
class; regression the predicted value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from kubeloop_pipelines.ml.text import PAD_ID, UNK_ID, encode_texts

Predict = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]
NUM_FEATURES = 8
TABULAR_SAMPLES = 1000
TEXT_SAMPLES = 500
UNKNOWN_WORD = "unknownword"  # what an out-of-vocabulary token reads as when decoded


@dataclass
class LocalExplanation:
    """One row's LIME explanation: conditions (or words) and their weights, strongest first."""

    row: int
    prediction: str
    explained: str  # the class (or "value") the weights push towards
    weights: list[tuple[str, float]]  # (condition or word, weight)
    features: list[int]  # the feature index (or word position) of each weight; -1 for words
    fit_score: float  # R² of the weighted linear model on the perturbations


def _as_classifier(predict: Predict, task: str) -> Predict:
    """LIME wants a 2-D output: a regression value becomes one column."""
    if task == "classification":
        return predict

    def one_column(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return np.asarray(predict(x), dtype=np.float32).reshape(-1)

    return one_column


def lime_tabular(
    predict: Predict,
    training_rows: npt.NDArray[np.float32],
    rows: npt.NDArray[np.float32],
    *,
    features: Sequence[str],
    task: str,
    classes: Sequence[str],
    num_features: int = NUM_FEATURES,
    num_samples: int = TABULAR_SAMPLES,
    seed: int = 0,
) -> list[LocalExplanation]:
    """LIME for each of ``rows`` (raw serving rows without missing values)."""
    from lime.lime_tabular import LimeTabularExplainer

    mode = "classification" if task == "classification" else "regression"
    explainer = LimeTabularExplainer(
        np.asarray(training_rows, dtype=np.float64),
        mode=mode,
        feature_names=list(features),
        class_names=list(classes) or None,
        discretize_continuous=True,
        random_state=seed,
    )
    model = _as_classifier(predict, task)

    def as_float32(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
        # LIME feeds float64 perturbations; the serving model takes float32
        return model(np.asarray(x, dtype=np.float32))

    out: list[LocalExplanation] = []
    for i, row in enumerate(np.asarray(rows, dtype=np.float64)):
        if task == "classification":
            label = int(np.argmax(predict(row[None].astype(np.float32))[0]))
            result = explainer.explain_instance(
                row, as_float32, labels=(label,), num_features=num_features,
                num_samples=num_samples,
            )  # fmt: skip
            prediction = explained = classes[label]
        else:
            result = explainer.explain_instance(
                row, as_float32, num_features=num_features, num_samples=num_samples
            )
            label = 1  # lime files a regression explanation under label 1
            prediction, explained = f"{float(result.predicted_value):.4g}", "value"
        # local_exp and as_list are in the same order: strongest |weight| first
        by_index, by_condition = result.local_exp[label], result.as_list(label=label)
        out.append(
            LocalExplanation(
                row=i, prediction=prediction, explained=explained,
                weights=[(str(c), float(w)) for c, w in by_condition],
                features=[int(j) for j, _ in by_index],
                fit_score=float(np.mean(result.score)),
            )
        )  # fmt: skip
    return out


def decode_tokens(ids: npt.ArrayLike, vocabulary: Sequence[str]) -> str:
    """The text a row of token ids stands for (padding dropped; unknown words as
    :data:`UNKNOWN_WORD`, which encodes back to the unknown id)."""
    words = []
    for token in (int(t) for t in np.asarray(ids, dtype=np.int64).reshape(-1)):
        if token == PAD_ID:
            continue
        known = token != UNK_ID and 0 <= token < len(vocabulary)
        words.append(vocabulary[token] if known else UNKNOWN_WORD)
    return " ".join(words)


def text_predictor(
    predict: Predict, vocabulary: Sequence[str], seq_len: int
) -> Callable[[list[str]], npt.NDArray[np.float32]]:
    """``predict`` on texts: each encoded into token ids as serving encodes them."""

    def on_texts(texts: list[str]) -> npt.NDArray[np.float32]:
        ids = encode_texts(texts, vocabulary, seq_len).astype(np.float32)
        return np.asarray(predict(ids), dtype=np.float32)

    return on_texts


def lime_text(
    predict_texts: Callable[[list[str]], npt.NDArray[np.float32]],
    texts: Sequence[str],
    *,
    task: str,
    classes: Sequence[str],
    num_features: int = NUM_FEATURES,
    num_samples: int = TEXT_SAMPLES,
    seed: int = 0,
) -> list[LocalExplanation]:
    """LIME for each text: the words whose removal moves the prediction most."""
    from lime.lime_text import LimeTextExplainer

    regression = task != "classification"
    explainer = LimeTextExplainer(
        class_names=["value"] if regression else list(classes), random_state=seed
    )

    def classifier(batch: list[str]) -> npt.NDArray[np.float32]:
        out = np.asarray(predict_texts(list(batch)), dtype=np.float32)
        return out.reshape(-1, 1) if regression else out

    explanations = []
    for i, text in enumerate(texts):
        first = classifier([text])[0]
        label = 0 if regression else int(np.argmax(first))
        result = explainer.explain_instance(
            text, classifier, labels=(label,), num_features=num_features, num_samples=num_samples
        )
        explanations.append(
            LocalExplanation(
                row=i,
                prediction=f"{float(first[0]):.4g}" if regression else classes[label],
                explained="value" if regression else classes[label],
                weights=[(str(w), float(v)) for w, v in result.as_list(label=label)],
                features=[-1] * len(result.as_list(label=label)),
                fit_score=float(np.mean(result.score)),
            )
        )
    return explanations
