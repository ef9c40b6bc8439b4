"""The built-in datasets (``builtin://NAME``): they need no network; three ship inside
scikit-learn's wheel, three are generated here from a seed.

=============  ===============  ===========  ============================================
name           target           task         what
=============  ===============  ===========  ============================================
breast-cancer  ``label``        binary       30 numeric features, malignant / benign
digits         ``digit``        10 classes   8x8 grey images as ``px_0..px_63`` (0-16)
diabetes       ``progression``  regression   10 numeric features (raw units)
fraud          ``is_fraud``     binary, 1 %  12 numeric + 2 categorical, some missing
reviews        ``sentiment``    binary       short product reviews in ``text``
ranking        ``relevance``    0-3 grades   search results grouped by ``query_id``
=============  ===============  ===========  ============================================

``fraud`` is built so that imbalance handling matters: frauds sit in a compact pocket of five
features where legitimate rows are still the majority, and shift six more features weakly. At a
1 % prior a model trained without reweighting rarely reaches a 0.5 fraud probability (minority
recall about 5-20 %), while a rebalanced one (SMOTE, class weights, an alpha-weighted focal
loss) recovers half to three quarters of the frauds at a similar ROC AUC (about 0.93).

``ranking`` is a learning-to-rank table: :data:`RANKING_QUERIES` queries with
:data:`RANKING_DOCS_PER_QUERY` candidate documents each, the graded relevance (0-3) of each to
its query, and ``query_id`` to use as ``data.groupColumn``. ``text_match`` decides relevance
(with a little of ``freshness`` and noise); ``popularity`` and ``doc_length`` carry nothing, so
a model ranking by them alone scores like a random order.

``reviews`` also provides :data:`REVIEW_SYNONYMS`, the text-augmentation table.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from kubeloop.api.training_run import BUILTIN_DATASETS
from kubeloop_pipelines.contract import Modality, StepError

BUILTIN_TARGETS: dict[str, str] = {
    "breast-cancer": "label",
    "digits": "digit",
    "diabetes": "progression",
    "fraud": "is_fraud",
    "reviews": "sentiment",
    "ranking": "relevance",
}
BUILTIN_MODALITY: dict[str, Modality] = {"digits": "image", "reviews": "text"}
DIGITS_SHAPE = (1, 8, 8)

FRAUD_ROWS = 20_000
FRAUD_RATE = 0.01
FRAUD_POCKET = 0.8  # latent mean of frauds in the pocket features (legitimate rows: 0)
FRAUD_SPREAD = 0.6  # their standard deviation (legitimate rows: 1)
REVIEW_ROWS = 600
RANKING_QUERIES = 120
RANKING_DOCS_PER_QUERY = 10
RANKING_GRADE_EDGES = (0.5, 1.5, 2.5)  # relevance score → grades 0, 1, 2, 3


def _snake(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def _breast_cancer() -> pd.DataFrame:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    frame = pd.DataFrame(bunch.data, columns=[_snake(n) for n in bunch.feature_names])
    frame["label"] = np.asarray(bunch.target_names)[bunch.target]
    return frame


def _digits() -> pd.DataFrame:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    frame = pd.DataFrame(
        bunch.data.astype(np.float32), columns=[f"px_{i}" for i in range(bunch.data.shape[1])]
    )
    frame["digit"] = bunch.target.astype(np.int64)
    return frame


def _diabetes() -> pd.DataFrame:
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes(scaled=False)  # raw units: what a client would send
    frame = pd.DataFrame(bunch.data, columns=[_snake(n) for n in bunch.feature_names])
    frame["progression"] = bunch.target.astype(np.float64)
    return frame


def _fraud(seed: int) -> pd.DataFrame:
    """Card transactions, 1 % fraud. Each feature is a monotone map of a latent standard normal;
    frauds shift the latents by about one standard deviation (see the module docstring)."""
    rng = np.random.default_rng(seed)
    n = FRAUD_ROWS
    is_fraud = np.zeros(n, dtype=np.int64)
    is_fraud[rng.choice(n, size=round(n * FRAUD_RATE), replace=False)] = 1
    # Frauds form a compact pocket (spread FRAUD_SPREAD, shifted FRAUD_POCKET) in five features:
    # inside it frauds are still a minority of the rows (posterior mostly < 0.5), but a
    # rebalanced model finds it easily. Six more features carry weak shifts; one is noise.
    pocket = ("amount", "hour", "distance_from_home", "velocity_1h", "merchant_risk")
    weak_shifts = {
        "distance_from_last": 0.5,
        "velocity_24h": 0.5,
        "account_age_days": -0.4,
        "device_age_days": -0.4,
        "amount_to_median": 0.3,
        "failed_logins_24h": 0.3,
        "customer_age": 0.0,
    }
    fraud = is_fraud == 1
    latent: dict[str, np.ndarray] = {}
    for name in pocket:
        values = rng.standard_normal(n)
        values[fraud] = FRAUD_POCKET + FRAUD_SPREAD * values[fraud]
        latent[name] = values
    for name, shift in weak_shifts.items():
        latent[name] = rng.standard_normal(n) + shift * is_fraud
    frame = pd.DataFrame(
        {
            "amount": np.round(np.exp(3.6 + 0.9 * latent["amount"]), 2),
            # daytime for most customers; frauds drift towards the night
            "hour": np.clip(np.round(14.0 - 4.0 * latent["hour"]), 0, 23),
            "distance_from_home": np.round(np.exp(2.0 + 1.0 * latent["distance_from_home"]), 1),
            "distance_from_last": np.round(np.exp(1.5 + 1.1 * latent["distance_from_last"]), 1),
            "velocity_1h": np.floor(np.exp(0.3 + 0.6 * latent["velocity_1h"])),
            "velocity_24h": np.floor(np.exp(1.5 + 0.5 * latent["velocity_24h"])),
            "account_age_days": np.round(np.exp(6.0 + 0.8 * latent["account_age_days"])),
            "device_age_days": np.round(np.exp(4.5 + 1.0 * latent["device_age_days"])),
            "amount_to_median": np.round(np.exp(0.5 * latent["amount_to_median"]), 3),
            "failed_logins_24h": np.floor(np.exp(0.6 * latent["failed_logins_24h"]) - 0.6),
            "merchant_risk": np.round(1.0 / (1.0 + np.exp(1.5 - latent["merchant_risk"])), 3),
            "customer_age": np.clip(np.round(42 + 13 * latent["customer_age"]), 18, 90),
        }
    )
    frame["failed_logins_24h"] = frame["failed_logins_24h"].clip(lower=0)
    channels = np.array(["pos", "app", "web", "phone"])
    legit_channel = rng.choice(4, size=n, p=[0.45, 0.30, 0.20, 0.05])
    fraud_channel = rng.choice(4, size=n, p=[0.20, 0.25, 0.45, 0.10])
    frame["channel"] = channels[np.where(is_fraud == 1, fraud_channel, legit_channel)]
    categories = np.array(
        ["grocery", "fuel", "restaurants", "fashion", "electronics", "travel", "gaming", "other"]
    )
    legit_cat = rng.choice(8, size=n, p=[0.25, 0.15, 0.15, 0.12, 0.10, 0.08, 0.05, 0.10])
    fraud_cat = rng.choice(8, size=n, p=[0.08, 0.08, 0.08, 0.12, 0.25, 0.17, 0.15, 0.07])
    frame["merchant_category"] = categories[np.where(is_fraud == 1, fraud_cat, legit_cat)]
    # missing values, as real exports have them: devices not seen before, geolocation failures
    for column, fraction in (
        ("device_age_days", 0.05),
        ("distance_from_home", 0.03),
        ("merchant_category", 0.02),
    ):
        frame.loc[rng.random(n) < fraction, column] = np.nan
    frame["is_fraud"] = is_fraud
    return frame


# Word lists of the generated review set; the synonym groups are also the text-augmentation
# table (ml/text.py turns them into token-id maps).
_PRODUCTS = (
    "headset", "blender", "laptop", "jacket", "kettle", "backpack", "lamp", "keyboard",
    "vacuum", "toaster", "speaker", "charger", "mattress", "camera", "drill", "umbrella",
)  # fmt: skip
_POSITIVE = (
    "great", "excellent", "fantastic", "superb", "wonderful", "amazing", "solid", "reliable",
    "sturdy", "comfortable", "quick", "perfect", "lovely", "impressive",
)  # fmt: skip
_NEGATIVE = (
    "terrible", "awful", "horrible", "dreadful", "poor", "bad", "flimsy", "faulty", "broken",
    "slow", "useless", "disappointing", "noisy", "defective",
)  # fmt: skip
_FILLERS = ("", "honestly, ", "overall ", "to be fair ", "after a week ", "so far ", "frankly ")
_POSITIVE_TEMPLATES = (
    "{f}the {p} is {a} and {b}.",
    "i love this {p}, it is {a}.",
    "{f}a really {a} {p}, would buy again.",
    "{a} quality and {b} delivery, the {p} works well.",
    "not {n} at all, the {p} is {a}.",
    "five stars, {f}a {a} {p}.",
    "the {p} looks {n} in photos but is {a} in person.",
    "{f}my new {p} is {a}, i recommend it.",
)
_NEGATIVE_TEMPLATES = (
    "{f}the {p} is {a} and {b}.",
    "i regret buying this {p}, it is {a}.",
    "{f}a really {a} {p}, returned it.",
    "{a} quality, the {p} stopped working after a month.",
    "not {n} at all, the {p} is {a}.",
    "one star, {f}a {a} {p}.",
    "the {p} looks {n} in photos but is {a} in person.",
    "{f}my new {p} is {a}, avoid it.",
)
REVIEW_SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("great", "excellent", "fantastic", "superb", "wonderful", "amazing"),
    ("terrible", "awful", "horrible", "dreadful"),
    ("poor", "bad"),
    ("faulty", "broken", "defective"),
    ("solid", "sturdy", "reliable"),
    ("love", "adore", "like"),
    ("regret", "rue"),
    ("quick", "fast"),
    ("really", "truly", "very"),
    ("avoid", "skip"),
    ("recommend", "suggest"),
    ("returned", "refunded"),
    ("lovely", "nice"),
)


def _reviews(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    labels: list[str] = []
    for _ in range(REVIEW_ROWS):
        positive = bool(rng.random() < 0.5)
        templates = _POSITIVE_TEMPLATES if positive else _NEGATIVE_TEMPLATES
        words, opposite = (_POSITIVE, _NEGATIVE) if positive else (_NEGATIVE, _POSITIVE)
        first, second = rng.choice(len(words), size=2, replace=False)
        text = str(templates[rng.integers(len(templates))]).format(
            f=_FILLERS[rng.integers(len(_FILLERS))],
            p=_PRODUCTS[rng.integers(len(_PRODUCTS))],
            a=words[first],
            b=words[second],
            n=opposite[rng.integers(len(opposite))],
        )
        texts.append(text[0].upper() + text[1:])
        labels.append("positive" if positive else "negative")
    return pd.DataFrame({"text": texts, "sentiment": labels})


def _ranking(seed: int) -> pd.DataFrame:
    """Query-document pairs with graded relevance (see the module docstring)."""
    rng = np.random.default_rng(seed)
    n = RANKING_QUERIES * RANKING_DOCS_PER_QUERY
    text_match = rng.standard_normal(n)
    freshness = rng.random(n)
    # the known relevant feature dominates; the noise keeps a perfect order out of reach
    score = 1.5 * text_match + 0.3 * freshness + 0.4 * rng.standard_normal(n)
    return pd.DataFrame(
        {
            "query_id": np.repeat(np.arange(RANKING_QUERIES), RANKING_DOCS_PER_QUERY),
            "text_match": np.round(text_match, 4),
            "freshness": np.round(freshness, 4),
            "popularity": np.round(rng.standard_normal(n), 4),
            "doc_length": np.round(np.exp(6.0 + 0.5 * rng.standard_normal(n))),
            "relevance": np.digitize(score, RANKING_GRADE_EDGES).astype(np.int64),
        }
    )


def load_builtin(name: str, *, seed: int = 0) -> pd.DataFrame:
    """A built-in dataset as a frame (features + the target of :data:`BUILTIN_TARGETS`);
    ``seed`` drives the generated ones (fraud, reviews, ranking), the others ignore it."""
    if name == "breast-cancer":
        return _breast_cancer()
    if name == "digits":
        return _digits()
    if name == "diabetes":
        return _diabetes()
    if name == "fraud":
        return _fraud(seed)
    if name == "reviews":
        return _reviews(seed)
    if name == "ranking":
        return _ranking(seed)
    raise StepError(
        f"data.uri=builtin://{name} names no built-in dataset; expected one of "
        f"{', '.join(f'builtin://{n}' for n in BUILTIN_DATASETS)}",
        field="data.uri",
    )
