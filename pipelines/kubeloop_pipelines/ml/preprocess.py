"""Preprocessing: clean the raw splits, fit the transforms on the train split
(ml/transforms.py), transform every split and write the prepared directory with its
data-quality report (ml/quality.py); and read that directory back (:func:`load_prepared`).

Prepared directory (``contract.py`` lists the shared part)
-----------------------------------------------------------
- ``train.npz``, ``validation.npz``, ``test.npz``: ``x`` (the network input), ``y`` (class index
  int64 or value float32) and ``rows`` (the same examples in serving encoding, float32; what
  :meth:`Prepared.serving_rows` returns for drift references and latency tests) and, with
  ``data.groupColumn``, ``group`` (each row's group id as text, for the ranking metrics);
- ``transform.json``: everything fitted (see ``fit_transform`` in ml/transforms.py);
  ``schema.json`` (copied from ingest); ``quality.json`` (:func:`prepare`'s data-quality
  report).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from kubeloop.api.training_run import Preprocessing
from kubeloop_pipelines.contract import (
    QUALITY_FILE,
    SCHEMA_FILE,
    SPLITS,
    TRANSFORM_FILE,
    StepError,
    read_json,
    write_json,
)
from kubeloop_pipelines.ml.datasets import DatasetSchema, label_strings
from kubeloop_pipelines.ml.quality import (
    CleaningCounts,
    class_counts,
    missing_fractions,
    quality_report,
)
from kubeloop_pipelines.ml.transforms import (
    FloatArray,
    apply_transform,
    fit_scaling,
    fit_transform,
    serving_rows,
)

# --------------------------------------------------------------------------------------------
# cleaning and the prepared directory


def _targets(frame: pd.DataFrame, schema: DatasetSchema) -> npt.NDArray[Any]:
    if schema.task == "regression":
        return np.asarray(pd.to_numeric(frame[schema.target]), dtype=np.float32)
    index = {label: i for i, label in enumerate(schema.classes)}
    labels = label_strings(frame[schema.target])
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise StepError(
            f"data.target={schema.target!r} holds labels {unknown[:5]} that ingest did not see "
            f"(classes {schema.classes}); rerun ingest on this data",
            field="data.target",
        )
    return np.asarray(labels.map(index), dtype=np.int64)


def _check_no_empty_feature(train: pd.DataFrame, schema: DatasetSchema) -> None:
    empty = [name for name in schema.feature_names if train[name].isna().all()]
    if empty:
        raise StepError(
            f"feature {empty[0]!r} is missing in all {len(train)} training rows"
            + (f" (as are {empty[1:]})" if len(empty) > 1 else "")
            + "; nothing can be learned or imputed from it: drop it from data.features or fix "
            "the data",
            field="data.features",
        )


def _clean_rows(
    frames: dict[str, pd.DataFrame], schema: DatasetSchema, preprocessing: Preprocessing
) -> CleaningCounts:
    """Duplicate removal (within each split) and, for strategy ``drop``, rows with a missing
    feature (every split: the user asked to learn and score complete rows only)."""
    cleaning = CleaningCounts()
    for name in SPLITS:
        duplicated = frames[name].duplicated(keep="first")
        cleaning.duplicates_found += int(duplicated.sum())
        if preprocessing.drop_duplicates:
            cleaning.duplicates_removed += int(duplicated.sum())
            frames[name] = frames[name].loc[~duplicated].reset_index(drop=True)
        if preprocessing.missing.strategy == "drop":
            incomplete = frames[name][schema.feature_names].isna().any(axis=1)
            cleaning.missing_rows_dropped += int(incomplete.sum())
            frames[name] = frames[name].loc[~incomplete].reset_index(drop=True)
    if frames["train"].empty:
        raise StepError(
            f"no training rows are left after cleaning ({cleaning.duplicates_removed} duplicates "
            f"and {cleaning.missing_rows_dropped} rows with missing values removed); use "
            "another preprocessing.missing.strategy than 'drop' or fix the data",
            field="preprocessing.missing.strategy",
        )
    return cleaning


def _outlier_mask(rows: FloatArray, transform: Mapping[str, Any]) -> npt.NDArray[np.bool_]:
    """(n, features) True where a value lies outside its fitted outlier bounds."""
    mask = np.zeros(rows.shape, dtype=bool)
    for i, bounds in enumerate(transform["outliers"]["bounds"]):
        if bounds is not None:
            with np.errstate(invalid="ignore"):
                mask[:, i] = (rows[:, i] < bounds[0]) | (rows[:, i] > bounds[1])
    return mask


def prepare(
    raw_dir: Path,
    prepared_dir: Path,
    preprocessing: Preprocessing,
    *,
    progress: Any = None,
) -> dict[str, Any]:
    """Clean, fit on train, transform every split and write the prepared directory. Returns the
    data-quality report (also ``quality.json``); the quality gate is evaluated into
    ``report["gate"]`` but not enforced here (see ``enforce_quality_gate`` in ml/quality.py),
    so a failing run still leaves its report. ``progress`` is called with short status
    messages."""

    def say(message: str) -> None:
        if progress is not None:
            progress(message)

    schema = DatasetSchema.from_json(read_json(raw_dir / SCHEMA_FILE))
    frames = {name: pd.read_parquet(raw_dir / f"{name}.parquet") for name in SPLITS}
    names = schema.feature_names
    rows_before = {name: len(frames[name]) for name in SPLITS}
    missing_before = missing_fractions(frames, names)
    balance_before = (
        class_counts(pd.concat(frames.values()), schema) if schema.task == "classification" else {}
    )
    _check_no_empty_feature(frames["train"], schema)

    say("removing duplicates and incomplete rows")
    cleaning = _clean_rows(frames, schema, preprocessing)
    say(f"fitting transforms on {len(frames['train'])} training rows")
    transform = fit_transform(frames["train"], schema, preprocessing)
    rows = {name: serving_rows(frames[name], transform) for name in SPLITS}
    if schema.modality == "tabular":
        outliers = _outlier_mask(rows["train"], transform)
        cleaning.outliers_found = {
            name: int(outliers[:, i].sum()) for i, name in enumerate(names) if outliers[:, i].any()
        }
        if preprocessing.outliers.action == "drop" and outliers.any():
            keep = ~outliers.any(axis=1)
            cleaning.outlier_rows_dropped = int((~keep).sum())
            frames["train"] = frames["train"].loc[keep].reset_index(drop=True)
            rows["train"] = rows["train"][keep]
    fit_scaling(transform, rows["train"])

    say("transforming the splits")
    prepared_dir.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, npt.NDArray[Any]] = {}
    for name in SPLITS:
        x = apply_transform(transform, rows[name])
        arrays[name] = x
        # the group ids ride along row for row (cleaning above dropped rows in step)
        group = (
            {"group": label_strings(frames[name][schema.group_column]).to_numpy(dtype=str)}
            if schema.group_column
            else {}
        )
        np.savez(
            prepared_dir / f"{name}.npz",
            x=x,
            y=_targets(frames[name], schema),
            rows=rows[name],
            **group,
        )
    quality = quality_report(
        schema,
        transform=transform,
        preprocessing=preprocessing,
        frames=frames,
        arrays=arrays,
        rows_before=rows_before,
        missing_before=missing_before,
        cleaning=cleaning,
    )
    if balance_before:
        quality["class_balance"]["before"] = balance_before
    write_json(prepared_dir / TRANSFORM_FILE, transform)
    shutil.copyfile(raw_dir / SCHEMA_FILE, prepared_dir / SCHEMA_FILE)
    write_json(prepared_dir / QUALITY_FILE, quality)
    return quality


# --------------------------------------------------------------------------------------------
# reading the prepared directory


@dataclass
class Prepared:
    """The prepared dataset as numpy arrays plus its schema and fitted transform."""

    directory: Path
    schema: dict[str, Any]
    transform: dict[str, Any]
    x_train: npt.NDArray[Any]
    y_train: npt.NDArray[Any]
    x_validation: npt.NDArray[Any]
    y_validation: npt.NDArray[Any]
    x_test: npt.NDArray[Any]
    y_test: npt.NDArray[Any]
    rows: dict[str, FloatArray] = field(default_factory=dict, repr=False)
    groups: dict[str, npt.NDArray[np.str_]] = field(default_factory=dict, repr=False)

    def group_ids(self, split: str) -> npt.NDArray[np.str_] | None:
        """Each row's data.groupColumn id in ``split`` (None without a group column)."""
        return self.groups.get(split)

    def arrays(self, split: str) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        """``(x, y)`` of ``split`` (train, validation or test)."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r}; expected one of {list(SPLITS)}")
        return getattr(self, f"x_{split}"), getattr(self, f"y_{split}")

    def serving_rows(self, split: str) -> FloatArray:
        """The same examples as ``arrays(split)`` in serving encoding (float32)."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r}; expected one of {list(SPLITS)}")
        return self.rows[split]

    @property
    def task(self) -> str:
        return str(self.transform["task"])

    @property
    def modality(self) -> str:
        return str(self.transform["modality"])

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.transform["classes"]]

    @property
    def n_classes(self) -> int:
        return int(self.transform["n_classes"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.transform["input_shape"])

    @property
    def vocab_size(self) -> int:
        return int(self.transform.get("vocab_size") or 0)

    @property
    def serving_features(self) -> list[str]:
        return [str(f) for f in self.transform["serving_features"]]

    @property
    def input_features(self) -> list[str]:
        """Names of the network-input columns (tabular; e.g. ``channel=web`` for one-hot)."""
        return [str(f) for f in self.transform["input_features"]]

    @property
    def synonyms(self) -> dict[int, list[int]]:
        """Token id → synonym ids for text augmentation (empty for other modalities)."""
        return {
            int(k): [int(i) for i in v] for k, v in (self.transform.get("synonyms") or {}).items()
        }


def load_prepared(prepared_dir: str | Path) -> Prepared:
    """Read a directory :func:`prepare` wrote."""
    root = Path(prepared_dir)
    loaded: dict[str, dict[str, npt.NDArray[Any]]] = {}
    for name in SPLITS:
        path = root / f"{name}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: not a prepared dataset directory")
        with np.load(path) as npz:
            loaded[name] = {key: npz[key] for key in npz.files}
    return Prepared(
        directory=root,
        schema=read_json(root / SCHEMA_FILE),
        transform=read_json(root / TRANSFORM_FILE),
        x_train=loaded["train"]["x"],
        y_train=loaded["train"]["y"],
        x_validation=loaded["validation"]["x"],
        y_validation=loaded["validation"]["y"],
        x_test=loaded["test"]["x"],
        y_test=loaded["test"]["y"],
        rows={name: loaded[name]["rows"].astype(np.float32) for name in SPLITS},
        groups={name: loaded[name]["group"] for name in SPLITS if "group" in loaded[name]},
    )
