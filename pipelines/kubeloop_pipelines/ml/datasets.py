"""Where training data comes from and what it looks like: built-in datasets, reading tables from
file://, s3:// and gs://, schema inference and the seeded train/validation/test split.

Built-in datasets (``builtin://NAME``) need no network: three ship inside scikit-learn's wheel,
two are generated here from a seed.

=============  ===============  ===========  ============================================
name           target           task         what
=============  ===============  ===========  ============================================
breast-cancer  ``label``        binary       30 numeric features, malignant / benign
digits         ``digit``        10 classes   8x8 grey images as ``px_0..px_63`` (0-16)
diabetes       ``progression``  regression   10 numeric features (raw units)
fraud          ``is_fraud``     binary, 1 %  12 numeric + 2 categorical, some missing
reviews        ``sentiment``    binary       short product reviews in ``text``
=============  ===============  ===========  ============================================

``fraud`` is built so that imbalance handling matters: frauds sit in a compact pocket of five
features where legitimate rows are still the majority, and shift six more features weakly. At a
1 % prior a model trained without reweighting rarely reaches a 0.5 fraud probability (minority
recall about 5-20 %), while a rebalanced one (SMOTE, class weights, an alpha-weighted focal
loss) recovers half to three quarters of the frauds at a similar ROC AUC (about 0.93).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from kubeloop.api.training_run import BUILTIN_DATASETS, DataSource, Split
from kubeloop_pipelines.contract import SPLITS, StepError

Modality = Literal["tabular", "image", "text"]
FeatureKind = Literal["numeric", "categorical", "text"]

BUILTIN_TARGETS: dict[str, str] = {
    "breast-cancer": "label",
    "digits": "digit",
    "diabetes": "progression",
    "fraud": "is_fraud",
    "reviews": "sentiment",
}
BUILTIN_MODALITY: dict[str, Modality] = {"digits": "image", "reviews": "text"}
DIGITS_SHAPE = (1, 8, 8)

# A string column whose values average at least this many words is free text, not a category.
TEXT_MIN_MEAN_WORDS = 3.0
# A numeric classification target with more distinct non-integer values than this is surely
# a regression target given the wrong task.
MAX_FLOAT_CLASSES = 20

FRAUD_ROWS = 20_000
FRAUD_RATE = 0.01
FRAUD_POCKET = 0.8  # latent mean of frauds in the pocket features (legitimate rows: 0)
FRAUD_SPREAD = 0.6  # their standard deviation (legitimate rows: 1)
REVIEW_ROWS = 600


# --------------------------------------------------------------------------------------------
# built-in datasets


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
# table (ml/preprocess.py turns them into token-id maps).
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


def load_builtin(name: str, *, seed: int = 0) -> pd.DataFrame:
    """A built-in dataset as a frame (features + the target of :data:`BUILTIN_TARGETS`);
    ``seed`` drives the generated ones (fraud, reviews), the others ignore it."""
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
    raise StepError(
        f"data.uri=builtin://{name} names no built-in dataset; expected one of "
        f"{', '.join(f'builtin://{n}' for n in BUILTIN_DATASETS)}",
        field="data.uri",
    )


# --------------------------------------------------------------------------------------------
# reading tables


def table_format(uri: str, fmt: str) -> Literal["csv", "parquet"]:
    """The file format to read ``uri`` with: explicit csv/parquet, else from the extension
    (``images`` and ``text`` name the modality; their files are csv or parquet tables too)."""
    if fmt in ("csv", "parquet"):
        return "csv" if fmt == "csv" else "parquet"
    path = uri.lower().split("?", 1)[0]
    for suffix in (".gz", ".bz2", ".zip", ".xz", ".zst"):
        path = path.removesuffix(suffix)
    if path.endswith((".csv", ".tsv", ".txt")):
        return "csv"
    if path.endswith((".parquet", ".pq")):
        return "parquet"
    raise StepError(
        f"data.format={fmt!r} cannot tell how to read {uri}: the name ends in neither .csv nor "
        ".parquet; set data.format to 'csv' or 'parquet'",
        field="data.format",
    )


def read_table(
    uri: str, fmt: str, *, storage_options: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """Read a csv or parquet table from a ``file://``, ``s3://`` or ``gs://`` URI (fsspec;
    credentials from ``storage_options`` or the environment). Unreadable, missing or empty data
    raises :class:`StepError` on ``data.uri`` naming the URI and the reason."""
    import fsspec

    kind = table_format(uri, fmt)
    options = dict(storage_options or {})
    try:
        if kind == "csv":
            sep = "\t" if ".tsv" in uri.lower() else ","
            with fsspec.open(uri, "rb", compression="infer", **options) as handle:
                frame = pd.read_csv(handle, sep=sep)
        else:
            with fsspec.open(uri, "rb", **options) as handle:
                frame = pd.read_parquet(handle)
    except FileNotFoundError:
        raise StepError(
            f"data.uri={uri} does not exist; point it at a {kind} file", field="data.uri"
        ) from None
    except PermissionError as exc:
        raise StepError(
            f"data.uri={uri} cannot be read: permission denied ({exc}); check "
            "data.credentialsSecret",
            field="data.uri",
        ) from exc
    except pd.errors.EmptyDataError:
        raise StepError(
            f"data.uri={uri} is empty: the file holds no rows", field="data.uri"
        ) from None
    except (ValueError, pd.errors.ParserError, OSError, UnicodeDecodeError) as exc:
        # pyarrow's errors derive from ValueError/OSError; a network hiccup may heal
        transient = isinstance(exc, OSError) and not isinstance(exc, IsADirectoryError)
        raise StepError(
            f"data.uri={uri} cannot be read as {kind}: {exc}",
            field="data.uri",
            permanent=not transient,
        ) from exc
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise StepError(
            f"data.uri={uri} is empty: it holds {frame.shape[0]} rows and {frame.shape[1]} "
            "columns; expected a header and at least one row",
            field="data.uri",
        )
    frame.columns = [str(c) for c in frame.columns]
    return frame


def load_data(
    data: DataSource, *, storage_options: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """The whole table ``data.uri`` points at (a built-in dataset or a file)."""
    if data.uri.startswith("builtin://"):
        return load_builtin(data.uri.removeprefix("builtin://"))
    return read_table(data.uri, data.format, storage_options=storage_options)


# --------------------------------------------------------------------------------------------
# schema


@dataclass
class FeatureInfo:
    """One selected input column and how it is treated."""

    name: str
    kind: FeatureKind


@dataclass
class DatasetSchema:
    """What ingest learned about the data; ``schema.json`` in the raw and prepared layouts."""

    target: str
    task: Literal["classification", "regression"]
    modality: Modality
    features: list[FeatureInfo]
    classes: list[str] = field(default_factory=list)
    image_shape: list[int] | None = None
    source: str = ""
    sha256: str = ""
    rows: dict[str, int] = field(default_factory=dict)

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    def names_of(self, kind: FeatureKind) -> list[str]:
        return [f.name for f in self.features if f.kind == kind]

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "task": self.task,
            "modality": self.modality,
            "features": [{"name": f.name, "kind": f.kind} for f in self.features],
            "classes": list(self.classes),
            "image_shape": list(self.image_shape) if self.image_shape else None,
            "source": self.source,
            "sha256": self.sha256,
            "rows": dict(self.rows),
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> DatasetSchema:
        return cls(
            target=str(value["target"]),
            task=value["task"],
            modality=value["modality"],
            features=[FeatureInfo(str(f["name"]), f["kind"]) for f in value["features"]],
            classes=[str(c) for c in value.get("classes") or []],
            image_shape=[int(s) for s in value["image_shape"]]
            if value.get("image_shape")
            else None,
            source=str(value.get("source", "")),
            sha256=str(value.get("sha256", "")),
            rows={str(k): int(v) for k, v in (value.get("rows") or {}).items()},
        )


def _preview(values: Sequence[Any], limit: int = 20) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f", … ({len(values)} in all)" if len(values) > limit else "")


def select_columns(frame: pd.DataFrame, data: DataSource) -> pd.DataFrame:
    """The selected features (``data.features``, or every column but the target) and the
    target, in that order; wrong names raise :class:`StepError` listing the columns there are."""
    columns = [str(c) for c in frame.columns]
    if data.target not in columns:
        raise StepError(
            f"data.target={data.target!r} is not a column of {data.uri}; available columns: "
            f"{_preview(columns)}",
            field="data.target",
        )
    if data.features:
        missing = [f for f in data.features if f not in columns]
        if missing:
            raise StepError(
                f"data.features names columns that {data.uri} does not have: {missing}; "
                f"available columns: {_preview(columns)}",
                field="data.features",
            )
        if data.target in data.features:
            raise StepError(
                f"data.features includes the target {data.target!r}; list only input columns",
                field="data.features",
            )
        duplicates = sorted({f for f in data.features if data.features.count(f) > 1})
        if duplicates:
            raise StepError(
                f"data.features lists {duplicates} more than once; list each column once",
                field="data.features",
            )
        features = list(data.features)
    else:
        features = [c for c in columns if c != data.target]
    if not features:
        raise StepError(
            f"{data.uri} has no column besides the target {data.target!r}; add feature columns",
            field="data.features",
        )
    return frame.loc[:, [*features, data.target]]


def label_strings(target: pd.Series) -> pd.Series:
    """Class labels as strings, one definition for ingest and preprocess: whole-number floats
    (what a csv with gaps gives for integer labels) print without ``.0``."""
    if pd.api.types.is_bool_dtype(target):
        return target.map(lambda v: str(bool(v)).lower())
    if pd.api.types.is_float_dtype(target):
        values = target.to_numpy(dtype=np.float64)
        if np.all(np.isnan(values) | (values == np.round(values))):
            return target.map(lambda v: str(int(v)) if not math.isnan(v) else v)
    return target.map(str)


def sorted_classes(target: pd.Series) -> list[str]:
    """The class labels of a target column (nulls ignored), numbers in numeric order."""
    present = target.dropna()
    if pd.api.types.is_numeric_dtype(present) and not pd.api.types.is_bool_dtype(present):
        unique = np.unique(present.to_numpy(dtype=np.float64))
        return list(label_strings(pd.Series(unique)))
    return sorted(set(label_strings(present)))


def _is_text(column: pd.Series) -> bool:
    values = column.dropna()
    if values.empty:
        return False
    words = values.astype(str).str.split().str.len()
    return bool(words.mean() >= TEXT_MIN_MEAN_WORDS)


def _feature_kind(column: pd.Series) -> FeatureKind:
    if pd.api.types.is_bool_dtype(column) or pd.api.types.is_numeric_dtype(column):
        return "numeric"
    return "text" if _is_text(column) else "categorical"


def _image_shape(n_pixels: int) -> list[int] | None:
    for channels in (1, 3):
        side = math.isqrt(n_pixels // channels)
        if channels * side * side == n_pixels:
            return [channels, side, side]
    return None


def _builtin_name(uri: str) -> str:
    return uri.removeprefix("builtin://") if uri.startswith("builtin://") else ""


def infer_schema(frame: pd.DataFrame, data: DataSource) -> DatasetSchema:
    """Feature kinds, modality, classes and image shape of the selected columns (the frame
    :func:`select_columns` returns), checking that the target suits ``data.task``."""
    target = frame[data.target]
    present = target.dropna()
    if data.task == "regression":
        if not pd.api.types.is_numeric_dtype(present) or pd.api.types.is_bool_dtype(present):
            raise StepError(
                f"data.task='regression' needs a numeric target, but column {data.target!r} "
                f"holds {present.dtype} values (e.g. {_preview(list(present.unique()), 3)}); "
                "use task: classification, or a numeric target",
                field="data.task",
            )
        classes: list[str] = []
    else:
        if pd.api.types.is_float_dtype(present):
            values = present.to_numpy(dtype=np.float64)
            fractional = values != np.round(values)
            if fractional.any() and present.nunique() > MAX_FLOAT_CLASSES:
                raise StepError(
                    f"data.task='classification' but target {data.target!r} holds "
                    f"{present.nunique()} distinct fractional values; use task: regression",
                    field="data.task",
                )
        classes = sorted_classes(target)
        if len(classes) < 2:
            raise StepError(
                f"data.target={data.target!r} has {len(classes)} class(es) "
                f"({_preview(classes)}); classification needs at least 2 distinct labels",
                field="data.target",
            )
    features = [
        FeatureInfo(name, _feature_kind(frame[name]))
        for name in frame.columns
        if name != data.target
    ]
    builtin = _builtin_name(data.uri)
    modality: Modality = BUILTIN_MODALITY.get(builtin, "tabular")
    if data.format == "images":
        modality = "image"
    elif data.format == "text" or any(f.kind == "text" for f in features):
        modality = "text"
    image_shape: list[int] | None = None
    if modality == "image":
        image_shape = (
            list(DIGITS_SHAPE)
            if builtin == "digits" and len(features) == math.prod(DIGITS_SHAPE)
            else _check_image_features(features, data)
        )
    elif modality == "text":
        features = _check_text_features(features, data)
    return DatasetSchema(
        target=data.target,
        task=data.task,
        modality=modality,
        features=features,
        classes=classes,
        image_shape=image_shape,
        source=data.uri,
    )


def _check_image_features(features: list[FeatureInfo], data: DataSource) -> list[int]:
    not_numeric = [f.name for f in features if f.kind != "numeric"]
    if not_numeric:
        raise StepError(
            f"data.format='images' needs numeric pixel columns; {not_numeric[:5]} are not "
            "numeric; select only the pixel columns in data.features",
            field="data.features",
        )
    shape = _image_shape(len(features))
    if shape is None:
        raise StepError(
            f"data.format='images' needs a square image (H*W or 3*H*W pixel columns); "
            f"{len(features)} columns are selected; select the pixel columns in data.features",
            field="data.features",
        )
    return shape


def _check_text_features(features: list[FeatureInfo], data: DataSource) -> list[FeatureInfo]:
    text = [f for f in features if f.kind == "text"]
    if data.format == "text" and not text:
        # the user said text: take a lone string column even if its values are short
        text = [FeatureInfo(f.name, "text") for f in features if f.kind == "categorical"]
    if len(text) != 1 or len(features) != 1:
        raise StepError(
            f"a text dataset is modelled from one text column; data.features selects "
            f"{[f.name for f in features]} (text columns: {[f.name for f in text]}); set "
            "data.features to the one text column",
            field="data.features",
        )
    return text


def fingerprint(frame: pd.DataFrame) -> str:
    """sha256 of the column names and every value (row order included)."""
    digest = hashlib.sha256()
    digest.update("\x1f".join(map(str, frame.columns)).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# splitting


def split(
    frame: pd.DataFrame, settings: Split, *, target: str, task: str
) -> dict[str, pd.DataFrame]:
    """Seeded train/validation/test split (keys :data:`~kubeloop_pipelines.contract.SPLITS`).
    Classification with ``settings.stratify`` splits each class separately, so every split
    keeps the class ratios (a class of 3 rows still lands in all three splits)."""
    rng = np.random.default_rng(settings.seed)
    positions = np.arange(len(frame))
    if task == "classification" and settings.stratify:
        labels = label_strings(frame[target]).to_numpy()
        groups = [positions[labels == label] for label in sorted(set(labels))]
    else:
        groups = [positions]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for group in groups:
        shuffled = rng.permutation(group)
        n_test = round(len(shuffled) * settings.test)
        n_validation = round(len(shuffled) * settings.validation)
        if len(groups) > 1 and len(shuffled) >= 3:
            # a small class still appears in every split
            n_test, n_validation = max(n_test, 1), max(n_validation, 1)
        parts["test"].append(shuffled[:n_test])
        parts["validation"].append(shuffled[n_test : n_test + n_validation])
        parts["train"].append(shuffled[n_test + n_validation :])
    out: dict[str, pd.DataFrame] = {}
    for name in SPLITS:
        # rows of one split keep a seeded shuffled order, not grouped by class
        chosen = rng.permutation(np.concatenate(parts[name])) if parts[name] else positions[:0]
        out[name] = frame.iloc[chosen].reset_index(drop=True)
    return out
