"""Reading a TrainingRun attempt's run directory, wherever it lies.

The pipeline's steps write their progress records, the evaluation, the ModelVersion manifest,
the model, reports and plots into the attempt's run directory (``file://`` in local mode; the
tenant's ``s3://``/``gs://`` prefix on a cluster). The operator reads them the same way for
every executor, through fsspec: ``file://`` needs nothing more, object stores need ``s3fs`` or
``gcsfs`` (the ``objectstore`` extra of the operator image) and the credentials of the
operator's service account. All calls block: run them in a thread. fsspec is imported on first
use, so an operator that only keeps a registry never loads it.
"""

from __future__ import annotations

import json
from typing import Any

from kubeloop.backends.executor import ExecutorError
from kubeloop.contract.steps import EVALUATION_FILE, MANIFEST_FILE, MODEL_DIR, STEPS_DIR

LISTED_FOLDERS = ("reports", "plots")
TOP_FILES = ("metrics.json", EVALUATION_FILE)


class RunStore:
    """One run directory (``uri``), read through fsspec."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")
        import fsspec  # only an operator that reads a run directory loads it (~15 MB)

        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.uri)
        except (ImportError, ValueError) as exc:  # e.g. s3fs missing from the image
            raise ExecutorError(
                f"cannot read the run directory {uri}: {exc} (install the operator's "
                "'objectstore' extra for s3:// and gs://)",
                temporary=False,
            ) from exc

    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def read_json(self, name: str) -> dict[str, Any] | None:
        """The JSON object in ``<run>/<name>``; None when missing, unreadable or not an object."""
        try:
            with self.fs.open(self._path(name), "r") as fh:
                value = json.loads(fh.read())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def exists(self, name: str) -> bool:
        try:
            return bool(self.fs.exists(self._path(name)))
        except OSError:
            return False

    def _names(self, folder: str) -> list[str]:
        try:
            entries = self.fs.ls(self._path(folder), detail=False)
        except (FileNotFoundError, OSError):
            return []
        return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def steps(self) -> dict[str, dict[str, Any]]:
        """Every step's progress record, by step name (unreadable ones skipped)."""
        records: dict[str, dict[str, Any]] = {}
        for name in self._names(STEPS_DIR):
            if name.endswith(".json"):
                record = self.read_json(f"{STEPS_DIR}/{name}")
                if record is not None:
                    records[name.removesuffix(".json")] = record
        return records

    def artifacts(self) -> dict[str, str]:
        """URIs a person opens: the model, metrics, evaluation, the reports and plots."""
        found: dict[str, str] = {}
        if self.exists(MODEL_DIR):
            found["model"] = f"{self.uri}/{MODEL_DIR}"
        for name in TOP_FILES:
            if self.exists(name):
                found[name.removesuffix(".json")] = f"{self.uri}/{name}"
        for folder in LISTED_FOLDERS:
            for name in self._names(folder)[:12]:
                stem = name.rsplit(".", 1)[0]
                found[f"{folder[:-1]}:{stem}"] = f"{self.uri}/{folder}/{name}"
        return found

    def snapshot(self, *, finished: bool) -> dict[str, Any]:
        """What the operator reads of an attempt each pass: the step records and artifacts,
        and once the run finished, the evaluation and whether the manifest was written."""
        seen: dict[str, Any] = {"steps": self.steps(), "artifacts": self.artifacts()}
        if finished:
            seen["evaluation"] = self.read_json(EVALUATION_FILE)
            seen["manifest"] = self.exists(MANIFEST_FILE)
        return seen
