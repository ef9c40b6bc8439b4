"""What a running step tells the operator: one JSON record per step in the run directory.

A run directory (``run_uri``, e.g. ``file:///tmp/kubeloop/artifacts/<ns>/<run>/attempt-1``)
lies under the tenant's artifact prefix. Steps write ``steps/<step>.json`` there while they run
and publish the files a person wants to open (model, metrics, plots, reports). The operator
reads the same records whichever executor ran the pipeline, so ``kubectl get tr`` shows the
step and ``trial 7/20`` for a local run and for a Kubeflow run alike.

``run_uri`` may be empty (unit tests, ad-hoc use): then nothing is written.
"""

from __future__ import annotations

import json
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubeloop.contract.steps import STEPS_DIR, step_record


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def local_path(run_uri: str) -> Path | None:
    """The filesystem path of a file:// run directory; None for object stores."""
    if run_uri.startswith("file://"):
        return Path(run_uri.removeprefix("file://"))
    return None


def write_text(run_uri: str, name: str, text: str) -> str:
    """Write ``text`` to ``<run_uri>/<name>`` (atomically for file://); returns its URI."""
    uri = f"{run_uri.rstrip('/')}/{name}"
    path = local_path(run_uri)
    if path is not None:
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text)
        tmp.replace(target)
        return uri
    import fsspec  # object stores: only the pipeline image needs fsspec

    with fsspec.open(uri, "w") as fh:
        fh.write(text)
    return uri


def publish(run_uri: str, name: str, source: str | Path) -> str:
    """Copy a file or directory into the run directory; returns its URI ('' without a run)."""
    if not run_uri:
        return ""
    src = Path(source)
    uri = f"{run_uri.rstrip('/')}/{name}"
    path = local_path(run_uri)
    if path is not None:
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, dirs_exist_ok=True)
        else:
            shutil.copy2(src, target)
        return uri
    import fsspec

    fs, _, (root,) = fsspec.get_fs_token_paths(uri)
    fs.put(str(src), root, recursive=src.is_dir())
    return uri


class StepReport:
    """Progress of one step: ``started()``, any number of ``update(...)``, then ``succeeded()``
    or ``failed()``. Updates are throttled to one write a second unless ``force``."""

    def __init__(self, run_uri: str, step: str) -> None:
        self.run_uri = run_uri
        self.step = step
        self.record: dict[str, Any] = {"step": step, "state": "Pending", "tries": 0}
        self._last_write = 0.0

    def _write(self, *, force: bool = True) -> None:
        if not self.run_uri:
            return
        now = time.monotonic()
        if not force and now - self._last_write < 1.0:
            return
        self._last_write = now
        self.record["updatedAt"] = _now()
        write_text(self.run_uri, step_record(self.step), json.dumps(self.record, default=float))

    def started(self) -> None:
        self.record.update(state="Running", startedAt=_now(), message="")
        self.record["tries"] = int(self.record.get("tries", 0)) + 1
        self._write()

    def update(self, *, force: bool = False, **fields: Any) -> None:
        """Merge ``fields`` (e.g. ``message``, ``epoch``, ``trials={...}``) into the record."""
        self.record.update(fields)
        self._write(force=force)

    def succeeded(self, **fields: Any) -> None:
        self.record.update(fields)
        self.record.update(state="Succeeded", finishedAt=_now())
        self._write()

    def failed(self, message: str, *, field: str = "", permanent: bool = False) -> None:
        self.record.update(
            state="Failed", finishedAt=_now(), message=message, field=field, permanent=permanent
        )
        self._write()


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when it is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_steps(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every step record of a file:// run directory, by step name (unreadable ones skipped)."""
    records: dict[str, dict[str, Any]] = {}
    for path in sorted((run_dir / STEPS_DIR).glob("*.json")):
        record = read_json_object(path)
        if record is not None:
            records[path.stem] = record
    return records
