"""Every training example under ``examples/`` runs end to end: the real compiled pipeline, run by
the local executor (``kfp.local`` in a detached runner), exactly as the operator runs it.

Each ``examples/*/trainingrun.yaml`` is found by globbing, so a new example is covered without
touching this file. To keep CI short only the *sizes* shrink (epochs, tuning trials, explained
samples; retries off so a failure shows at once); the features stay as the example asks: model
family, imbalance handling, augmentation, tuning algorithm, explanation method, optimisation, and
therefore the very same list of pipeline steps.

The runs are detached (``LocalExecutor`` starts one ``kfp.local`` runner process per run), so
the module starts the selected examples' runs up front, ``PARALLEL_RUNS`` at a time, and each
parametrised test waits for its own run and checks it: on two cores two runs at a time take ~40 %
less wall time than one after the other, while each run stays close to its time alone (four at
once saved little more and doubled every run's time).

With three epochs an example's gates may well fail. Both outcomes are checked: gates passed →
``register`` ran and ``modelversion.json`` exists; gates failed → ``register`` did not run and
nothing was registered.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from kubeloop.api.training_run import SearchParameter, TrainingRun, TrainingRunSpec
from kubeloop.backends.executor import RunObservation, Submission
from kubeloop.backends.executor_local import LocalExecutor
from kubeloop.contract.steps import EVALUATION_FILE, MANIFEST_FILE
from kubeloop.serving.artifact import LoadedModel, load_model
from kubeloop_pipelines.compiler import CompiledPipeline, compile_spec, selected_steps
from kubeloop_pipelines.ml.preprocess import Prepared, load_prepared
from kubeloop_pipelines.ml.tune import grid_size, grid_values
from kubeloop_pipelines.progress import read_steps
from tests.conftest import EXAMPLES

EXAMPLE_FILES = sorted(EXAMPLES.glob("*/trainingrun.yaml"))
MAX_EPOCHS = 3
MAX_TRIALS = 3
MAX_SAMPLES = 8
RUN_TIMEOUT_S = 180.0
POLL_S = 0.5
PARALLEL_RUNS = 2
SERVING_ROWS = 5
NAMESPACE = "examples"
TASK_METRICS = {"classification": ("accuracy", "f1"), "regression": ("r2", "mse")}
# The KFP task and output holding the model that evaluate scored (the last one that makes one).
MODEL_OUTPUTS = {"optimize": "optimized", "train": "model"}


# --- shrinking an example ----------------------------------------------------------------------


def _shrink_grid(space: list[dict[str, Any]], budget: int) -> None:
    """Cut a grid's points (in place) so it has at most ``budget`` of them; every parameter
    keeps at least one point, and numeric ones keep their step (the grid stays valid)."""
    for param in space:
        points = grid_values(SearchParameter.model_validate(param))
        keep = max(1, min(len(points), budget))
        budget = max(1, budget // keep)
        if param["type"] == "categorical":
            param["values"] = param["values"][:keep]
        elif keep < len(points):
            # A quarter step past the last point kept: min < max holds even for one point.
            last, step = float(points[keep - 1]), float(param["step"])
            param["max"] = last * 10 ** (step / 4) if param["log"] else last + step / 4


def shrink(spec: TrainingRunSpec) -> TrainingRunSpec:
    """The same run, smaller: ≤ MAX_EPOCHS epochs, ≤ MAX_TRIALS trials, ≤ MAX_SAMPLES explained
    rows, no retries. Works on the canonical form (defaults filled), so an example that leaves
    e.g. ``explanation`` out still gets the default method, with fewer samples."""
    data = spec.model_dump(mode="json", by_alias=True)
    model = data["model"]
    model["epochs"] = min(model["epochs"], MAX_EPOCHS)
    tuning = data.get("tuning")
    if tuning is not None:
        tuning["maxTrials"] = min(tuning["maxTrials"], MAX_TRIALS)
        tuning["parallelTrials"] = min(tuning["parallelTrials"], tuning["maxTrials"])
        for param in tuning["searchSpace"]:
            if param["name"] in ("epochs", "model.epochs"):
                if param["type"] == "categorical":
                    small = [v for v in param["values"] if int(v) <= MAX_EPOCHS]
                    param["values"] = small or [str(MAX_EPOCHS)]
                else:
                    param["min"] = min(float(param["min"]), MAX_EPOCHS - 1)
                    param["max"] = min(float(param["max"]), MAX_EPOCHS)
        if tuning["algorithm"] == "grid":
            _shrink_grid(tuning["searchSpace"], MAX_TRIALS)
    data["explanation"]["samples"] = min(data["explanation"]["samples"], MAX_SAMPLES)
    data["retries"] = 0
    return TrainingRunSpec.model_validate(data)


def load_example(path: Path) -> tuple[str, TrainingRunSpec, TrainingRunSpec]:
    """(metadata.name, the example's spec, the shrunk spec)."""
    (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
    run = TrainingRun.model_validate(doc)
    return run.name, run.spec, shrink(run.spec)


def test_shrinking_keeps_every_feature() -> None:
    """Only sizes change: the shrunk examples run the same steps with the same choices."""
    assert len(EXAMPLE_FILES) >= 4, EXAMPLE_FILES
    names = [load_example(path)[0] for path in EXAMPLE_FILES]
    assert len(set(names)) == len(names), names  # one run directory each
    for path in EXAMPLE_FILES:
        _, spec, small = load_example(path)
        assert selected_steps(small) == selected_steps(spec), path
        assert small.model.epochs <= MAX_EPOCHS
        assert small.explanation.samples <= MAX_SAMPLES
        assert small.data == spec.data
        assert small.preprocessing == spec.preprocessing
        assert small.imbalance == spec.imbalance
        assert small.optimization == spec.optimization
        assert small.evaluation == spec.evaluation
        assert small.explanation.method == spec.explanation.method
        assert small.model.model_dump(exclude={"epochs"}) == spec.model.model_dump(
            exclude={"epochs"}
        )
        assert (small.tuning is None) == (spec.tuning is None), path
        if small.tuning is not None and spec.tuning is not None:
            assert small.tuning.algorithm == spec.tuning.algorithm
            assert small.tuning.objective == spec.tuning.objective
            assert [p.name for p in small.tuning.search_space] == [
                p.name for p in spec.tuning.search_space
            ]
            assert 1 <= small.tuning.parallel_trials <= small.tuning.max_trials <= MAX_TRIALS
            if small.tuning.algorithm == "grid":
                assert grid_size(small.tuning) <= MAX_TRIALS


# --- running them ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finished:
    """One example's run, ended: what ran, where its files are and how it ended."""

    example: Path
    spec: TrainingRunSpec  # the shrunk spec that ran
    compiled: CompiledPipeline
    run_dir: Path  # run_uri: step records and published files
    state_dir: Path  # the local executor's attempt directory: kfp.local's outputs
    seen: RunObservation
    seconds: float  # submit to the end, as observed


class Launcher:
    """Runs the examples through one LocalExecutor, ``PARALLEL_RUNS`` at a time, in background
    tasks; ``finished(example)`` waits for one."""

    def __init__(self, executor: LocalExecutor, root: Path, examples: list[Path]) -> None:
        self.executor = executor
        self.root = root
        self._slots = asyncio.Semaphore(PARALLEL_RUNS)
        self._runs = {example: asyncio.create_task(self._run(example)) for example in examples}

    async def finished(self, example: Path) -> Finished:
        return await self._runs[example]

    async def _run(self, example: Path) -> Finished:
        async with self._slots:
            name, _, spec = load_example(example)
            compiled = await asyncio.to_thread(compile_spec, spec)
            run_dir = self.root / "artifacts" / NAMESPACE / name / "attempt-1"
            uri = f"file://{run_dir}"
            sub = Submission(
                namespace=NAMESPACE,
                name=name,
                attempt=1,
                ir_yaml=compiled.ir_yaml,
                spec_hash=compiled.spec_hash,
                run_uri=uri,
                arguments={"run_uri": uri},
                timeout_s=RUN_TIMEOUT_S,
            )
            started = time.monotonic()
            run_id = await self.executor.submit(sub)
            seen = await self.executor.observe(NAMESPACE, name, 1, run_id)
            # The executor fails the run at timeout_s; the margin covers its polling.
            deadline = started + RUN_TIMEOUT_S + 30
            while seen.state not in ("Succeeded", "Failed", "Unknown"):
                if time.monotonic() > deadline:
                    raise AssertionError(f"{name} still {seen.state} after {RUN_TIMEOUT_S:g}s")
                await asyncio.sleep(POLL_S)
                seen = await self.executor.observe(NAMESPACE, name, 1, run_id)
            return Finished(
                example=example,
                spec=spec,
                compiled=compiled,
                run_dir=run_dir,
                state_dir=self.executor.run_dir(NAMESPACE, name, 1),
                seen=seen,
                seconds=time.monotonic() - started,
            )

    async def close(self) -> None:
        for task in self._runs.values():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._runs.values(), return_exceptions=True)
        await asyncio.to_thread(self.executor.stop_all)


def selected_examples(session: pytest.Session) -> list[Path]:
    """The examples whose test this session runs (``-k`` may pick a few), in order."""
    chosen = set()
    for item in session.items:
        callspec = getattr(item, "callspec", None)
        module = item.module if isinstance(item, pytest.Function) else None
        if callspec is not None and module is not None and module.__name__ == __name__:
            chosen.add(callspec.params.get("example"))
    return [example for example in EXAMPLE_FILES if example in chosen]


@pytest.fixture(scope="module")
async def launcher(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Launcher]:
    root = tmp_path_factory.mktemp("examples-train")
    runs = Launcher(LocalExecutor(root / "state"), root, selected_examples(request.session))
    try:
        yield runs
    finally:
        await runs.close()  # cancels the waits and stops every runner still going


# --- checking one ---------------------------------------------------------------------------------


def failure_report(seen: RunObservation, records: dict[str, dict[str, Any]]) -> str:
    failed = {
        step: record.get("message", "")
        for step, record in records.items()
        if record.get("state") != "Succeeded"
    }
    return (
        f"run {seen.state}: {seen.message}\nfailed step: {seen.failed_step}\n"
        f"step records not Succeeded: {json.dumps(failed, indent=2)}\n"
        f"--- log tail ---\n{seen.log_tail}"
    )


def kfp_output(state_dir: Path, task: str, output: str) -> Path:
    """The path kfp.local gave a task's output artifact (``outputs/<run>/<task>/<output>``)."""
    found = sorted(state_dir.glob(f"outputs/*/{task}/{output}"))
    assert len(found) == 1, f"expected one {task}/{output} output, found {found}"
    return found[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_evaluation(run: Finished, records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """evaluation.json, published to the run directory: the task's metrics and the gates."""
    task = run.spec.data.task
    evaluation: dict[str, Any] = json.loads((run.run_dir / EVALUATION_FILE).read_text())
    assert evaluation["task"] == task
    for metric in TASK_METRICS[task]:
        value = evaluation["metrics"][metric]
        assert isinstance(value, float), (metric, value)
        assert math.isfinite(value), (metric, value)
    assert isinstance(evaluation["gatesPassed"], bool), evaluation
    assert records["evaluate"]["outputs"]["gates_passed"] is evaluation["gatesPassed"]
    assert len(evaluation["gates"]) == len(run.spec.evaluation.gates)
    return evaluation


def check_registration(run: Finished, records: dict[str, dict[str, Any]], passed: bool) -> None:
    """Registered exactly when the gates passed."""
    manifest_path = run.run_dir / MANIFEST_FILE
    if passed:
        assert records.get("register", {}).get("state") == "Succeeded", records.get("register")
        manifest = json.loads(manifest_path.read_text())
        assert manifest["kind"] == "ModelVersion"
        assert manifest["spec"]["task"] == run.spec.data.task
    else:
        assert "register" not in records, records["register"]
        assert not manifest_path.exists()


def check_explanation(run: Finished, records: dict[str, dict[str, Any]]) -> None:
    """The explanation report and plots, when the example asks for an explanation."""
    method = run.spec.explanation.method
    if method == "none":
        return
    assert (run.run_dir / "reports" / "explanation.html").is_file()
    assert (run.run_dir / "plots" / "explanation_importance.png").is_file()
    assert records["explain"]["outputs"]["method"] == method
    if method == "gradcam":
        plots = run.run_dir / "plots"
        heatmaps = sorted(plots.glob("*heatmap*.png"))
        assert heatmaps, sorted(p.name for p in plots.iterdir())
        assert heatmaps[0].read_bytes().startswith(b"\x89PNG")


def check_serving(model: LoadedModel, prepared: Prepared, task: str, where: Path) -> None:
    """The artifact takes raw serving rows of the test split and answers per its task."""
    assert model.task == task, where
    assert model.features == prepared.serving_features, where
    rows = prepared.serving_rows("test")[:SERVING_ROWS]
    out = model.predict(rows)
    assert np.isfinite(out).all(), (where, out)
    if task == "classification":
        assert model.classes == prepared.classes, where
        assert out.shape == (len(rows), len(prepared.classes)), (where, out.shape)
        assert np.allclose(out.sum(axis=1), 1.0, atol=1e-4), (where, out)
    else:
        assert out.shape == (len(rows),), (where, out.shape)


def check_models(run: Finished, evaluation: dict[str, Any]) -> None:
    """The model evaluate scored (train's output, or optimize's when it ran) and the ``model/``
    published to the run directory (train's; register's when the gates passed) load with the
    serving loader and predict; the scored one reproduces evaluate's test metric."""
    task = run.spec.data.task
    prepared = load_prepared(kfp_output(run.state_dir, "preprocess", "prepared"))
    maker = "optimize" if "optimize" in run.compiled.steps else "train"
    scored_dir = kfp_output(run.state_dir, maker, MODEL_OUTPUTS[maker])
    scored = load_model(scored_dir)
    check_serving(scored, prepared, task, scored_dir)
    outputs = scored.predict(prepared.serving_rows("test"))
    y_test = np.asarray(prepared.y_test)
    if task == "classification":
        accuracy = float(np.mean(outputs.argmax(axis=1) == y_test))
        assert accuracy == pytest.approx(evaluation["metrics"]["accuracy"], abs=1e-6)
    else:
        mse = float(np.mean((y_test.astype(np.float64) - outputs.astype(np.float64)) ** 2))
        assert mse == pytest.approx(evaluation["metrics"]["mse"], rel=1e-4)
    published = run.run_dir / "model"
    check_serving(load_model(published), prepared, task, published)
    if evaluation["gatesPassed"]:  # what was registered is what was scored
        assert sha256(published / "model.pt2") == sha256(scored_dir / "model.pt2")


@pytest.mark.parametrize("example", EXAMPLE_FILES, ids=lambda p: p.parent.name)
async def test_example_trains_end_to_end(example: Path, launcher: Launcher) -> None:
    run = await launcher.finished(example)
    records = read_steps(run.run_dir)
    print(f"\n{example.parent.name}: {run.seen.state} in {run.seconds:.1f}s")
    assert run.seen.state == "Succeeded", failure_report(run.seen, records)
    # Every step up to evaluate, and explain (which does not wait on the gates), succeeded.
    assert run.compiled.steps[-1] == "register"
    for step in run.compiled.steps[:-1]:
        assert records.get(step, {}).get("state") == "Succeeded", (step, records.get(step))
    evaluation = check_evaluation(run, records)
    passed = evaluation["gatesPassed"]
    print(f"  gates {'passed' if passed else 'failed'}: {evaluation['gateSummary']}")
    check_registration(run, records, passed)
    check_explanation(run, records)
    check_models(run, evaluation)
