"""What every component does around its step (``step_runner.run_step``): the progress record, the
KFP metrics, the output directories, and how failures are recorded and re-raised."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kfp import dsl
from pydantic import ValidationError

from kubeloop.api.training_run import TrainingRunSpec
from kubeloop_pipelines.contract import StepError
from kubeloop_pipelines.step_runner import STEPS_PACKAGE_ENV, run_step

SPEC = TrainingRunSpec.model_validate(
    {
        "data": {"uri": "builtin://breast-cancer", "target": "target"},
        "registration": {"modelName": "cancer"},
    }
).model_dump_json(by_alias=True)

# Stand-in step modules (the real ones are tested on their own): behaviour chosen by a file.
STEP_SOURCE = """
import json
from pathlib import Path
from kubeloop_pipelines.contract import StepError, StepResult

CALLS = Path(__file__).with_name("calls.txt")


def run(spec, *, report, run_uri, model_dir, curves_html, params_path=None):
    CALLS.write_text(CALLS.read_text() + "x" if CALLS.exists() else "x")
    mode = Path(__file__).with_name("mode.txt").read_text().strip()
    if mode == "permanent":
        raise StepError("column 'label' not found", field="data.target")
    if mode == "flaky":
        raise ConnectionError("object store reset the connection")
    report.update(epoch=1, force=True)
    (model_dir / "model.pt2").write_text("weights")
    curves_html.write_text("<html></html>")
    return StepResult(
        metrics={"val_loss": 0.25, "accuracy": 0.9},
        confusion=(["benign", "malignant"], [[50, 2], [3, 45]]),
        roc=([0.0, 0.1, 1.0], [0.0, 0.8, 1.0], [1.0, 0.5, 0.0]),
        outputs={"gates_passed": True},
        published={"model": "model"},
    )
"""


@pytest.fixture
def steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    package = tmp_path / "standin_steps"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "train.py").write_text(textwrap.dedent(STEP_SOURCE))
    (package / "mode.txt").write_text("ok")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(STEPS_PACKAGE_ENV, "standin_steps")
    forget = [name for name in sys.modules if name.split(".")[0] == "standin_steps"]
    for name in forget:  # each test has its own copy in its own tmp_path
        del sys.modules[name]
    yield package
    for name in [name for name in sys.modules if name.split(".")[0] == "standin_steps"]:
        del sys.modules[name]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


def record(run_dir: Path) -> dict[str, Any]:
    value: dict[str, Any] = json.loads((run_dir / "steps" / "train.json").read_text())
    return value


def train(run_dir: Path, tmp_path: Path, **logs: Any) -> Any:
    paths = {"model_dir": str(tmp_path / "out" / "model"), "curves_html": str(tmp_path / "c/h")}
    return run_step("train", SPEC, f"file://{run_dir}", paths, **logs)


def test_success_logs_metrics_and_records_the_step(
    steps: Path, run_dir: Path, tmp_path: Path
) -> None:
    metrics, classification = dsl.Metrics(), dsl.ClassificationMetrics()
    summary = dsl.Markdown(uri=str(tmp_path / "summary.md"))
    result = train(
        run_dir, tmp_path, metrics=metrics, classification=classification, summary=summary
    )
    assert result.outputs == {"gates_passed": True}
    assert (tmp_path / "out" / "model" / "model.pt2").read_text() == "weights"
    assert metrics.metadata == {"accuracy": 0.9, "val_loss": 0.25}
    assert classification.metadata["confusionMatrix"]["rows"] == [
        {"row": [50, 2]},
        {"row": [3, 45]},
    ]
    assert len(classification.metadata["confidenceMetrics"]) == 3
    assert "| accuracy | 0.9 |" in Path(summary.path).read_text()
    rec = record(run_dir)
    assert rec["state"] == "Succeeded"
    assert rec["tries"] == 1
    assert rec["epoch"] == 1
    assert rec["metrics"] == {"val_loss": 0.25, "accuracy": 0.9}
    assert rec["published"] == {"model": "model"}


def test_a_step_error_is_recorded_with_its_field_and_reraised(
    steps: Path, run_dir: Path, tmp_path: Path
) -> None:
    (steps / "mode.txt").write_text("permanent")
    with pytest.raises(StepError, match="column 'label' not found"):
        train(run_dir, tmp_path)
    rec = record(run_dir)
    assert (rec["state"], rec["field"], rec["permanent"]) == ("Failed", "data.target", True)
    assert rec["message"] == "column 'label' not found"


def test_a_permanent_failure_is_not_run_again_on_retry(
    steps: Path, run_dir: Path, tmp_path: Path
) -> None:
    (steps / "mode.txt").write_text("permanent")
    with pytest.raises(StepError):
        train(run_dir, tmp_path)
    (steps / "mode.txt").write_text("ok")  # even if it would pass now: same run, same input
    with pytest.raises(StepError, match="not retried: permanent"):
        train(run_dir, tmp_path)
    assert (steps / "calls.txt").read_text() == "x"  # the step ran once
    rec = record(run_dir)
    assert (rec["state"], rec["tries"], rec["permanent"]) == ("Failed", 2, True)


def test_other_errors_are_recorded_with_a_traceback_and_may_be_retried(
    steps: Path, run_dir: Path, tmp_path: Path
) -> None:
    (steps / "mode.txt").write_text("flaky")
    with pytest.raises(ConnectionError):
        train(run_dir, tmp_path)
    rec = record(run_dir)
    assert rec["state"] == "Failed"
    assert rec["permanent"] is False
    assert rec["message"].startswith("ConnectionError: object store reset the connection")
    assert "standin_steps/train.py" in rec["message"]
    (steps / "mode.txt").write_text("ok")  # the retry runs the step again and succeeds
    train(run_dir, tmp_path)
    assert (record(run_dir)["state"], record(run_dir)["tries"]) == ("Succeeded", 2)


def test_an_invalid_spec_fails_permanently(steps: Path, run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        run_step("train", '{"data": {}}', f"file://{run_dir}", {})
    rec = record(run_dir)
    assert rec["permanent"] is True
    assert rec["message"].startswith("invalid spec:")
    assert not (steps / "calls.txt").exists()
