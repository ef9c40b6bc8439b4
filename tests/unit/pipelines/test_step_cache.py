"""Content-addressed step inputs: the data fingerprint, the per-step keys, what the compiled
IR hands the cached steps, and the run store's step cache that run_step looks in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from kubeloop.api.training_run import DataSource, TrainingRunSpec
from kubeloop_pipelines import step_cache
from kubeloop_pipelines.compiler import compile_spec
from kubeloop_pipelines.step_cache import (
    data_fingerprint,
    file_fingerprint,
    sliced_spec_json,
    step_key,
)
from kubeloop_pipelines.step_runner import RUN_URI_ENV, adopt_records, run_step

BASE: dict[str, Any] = {
    "data": {"uri": "builtin://breast-cancer", "target": "target"},
    "model": {"epochs": 3},
    "explanation": {"method": "none"},
    "registration": {"modelName": "cancer"},
}


def spec_of(**changes: Any) -> TrainingRunSpec:
    doc = json.loads(json.dumps(BASE))
    for dotted, value in changes.items():
        target = doc
        *parents, leaf = dotted.split(".")
        for key in parents:
            target = target.setdefault(key, {})
        target[leaf] = value
    return TrainingRunSpec.model_validate(doc)


def key(spec: TrainingRunSpec, step: str, fingerprint: str = "sha256:x") -> str:
    return step_key(step, sliced_spec_json(spec, step), fingerprint)


# --- the fingerprint -------------------------------------------------------------------------


def test_one_changed_byte_changes_the_fingerprint_a_copy_does_not(tmp_path: Path) -> None:
    original = tmp_path / "a" / "table.csv"
    original.parent.mkdir()
    original.write_bytes(b"x,y\n1,0\n2,1\n")
    copy = tmp_path / "elsewhere" / "renamed.csv"
    copy.parent.mkdir()
    shutil.copyfile(original, copy)  # a new mtime too: it must not matter

    def fp(path: Path) -> str:
        return data_fingerprint(DataSource(uri=f"file://{path}", target="y"))

    assert fp(original) == fp(copy)
    assert fp(original).startswith("sha256:")
    changed = tmp_path / "changed.csv"
    changed.write_bytes(b"x,y\n1,0\n2,2\n")  # one byte
    assert fp(changed) != fp(original)


def test_a_big_file_is_fingerprinted_by_its_size_and_edges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(step_cache, "FULL_HASH_LIMIT", 64)
    monkeypatch.setattr(step_cache, "EDGE_BYTES", 8)
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(200)))
    before = file_fingerprint(big)
    assert before.startswith("edges:")
    big.write_bytes(bytes(range(199)) + b"\xff")  # the last byte: seen
    assert file_fingerprint(big) != before
    big.write_bytes(bytes(range(201)))  # appended: seen (size)
    assert file_fingerprint(big) != before


def test_builtin_data_by_name_and_version_extra_sources_count() -> None:
    cancer = data_fingerprint(DataSource(uri="builtin://breast-cancer", target="target"))
    assert cancer == data_fingerprint(DataSource(uri="builtin://breast-cancer", target="other"))
    assert cancer != data_fingerprint(DataSource(uri="builtin://digits", target="target"))
    more = DataSource.model_validate(
        {"uri": "builtin://breast-cancer", "target": "target", "extra": [{"uri": "builtin://x"}]}
    )
    assert data_fingerprint(more) != cancer


def test_a_directory_is_fingerprinted_file_by_file(tmp_path: Path) -> None:
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "a.jsonl").write_text("{}\n")
    source = DataSource(uri=f"file://{tmp_path / 'log'}", target="y")
    before = data_fingerprint(source)
    (tmp_path / "log" / "b.jsonl").write_text("{}\n")
    assert data_fingerprint(source) != before


# --- the per-step keys -----------------------------------------------------------------------


def test_a_step_key_follows_only_the_fields_it_reads() -> None:
    base = spec_of()
    epochs = spec_of(**{"model.epochs": 50})
    scaling = spec_of(**{"preprocessing.scaling": "minmax"})
    target = spec_of(**{"data.split.seed": 7})
    for step in ("ingest", "preprocess"):
        assert key(epochs, step) == key(base, step)  # model.epochs: read by neither
    assert key(scaling, "ingest") == key(base, "ingest")
    assert key(scaling, "preprocess") != key(base, "preprocess")
    assert key(target, "ingest") != key(base, "ingest")
    assert key(target, "preprocess") != key(base, "preprocess")
    assert key(base, "ingest", "sha256:other") != key(base, "ingest")  # the data changed
    assert key(base, "ingest") != key(base, "preprocess")
    assert step_cache.SPEC_SLICES["train"] is None  # whole spec: not cached


# --- what the IR hands the cached steps ------------------------------------------------------


def task_inputs(ir_yaml: str) -> dict[str, dict[str, Any]]:
    pipeline = next(yaml.safe_load_all(ir_yaml))
    tasks: dict[str, dict[str, Any]] = dict(pipeline["root"]["dag"]["tasks"])
    return {name: task.get("inputs", {}) for name, task in tasks.items()}


def test_cached_steps_get_content_addressed_inputs_and_no_run_uri() -> None:
    base = task_inputs(compile_spec(spec_of()).ir_yaml)
    again = task_inputs(compile_spec(spec_of()).ir_yaml)  # the IR every attempt submits
    epochs = task_inputs(compile_spec(spec_of(**{"model.epochs": 50})).ir_yaml)
    for step in ("ingest", "preprocess"):
        params = base[step]["parameters"]
        assert "run_uri" not in params  # the per-attempt argument is no input of theirs
        assert not any(p.get("componentInputParameter") == "run_uri" for p in params.values()), (
            params
        )
        assert params["data_fingerprint"]["taskOutputParameter"]["producerTask"] == "fingerprint"
        assert base[step] == again[step] == epochs[step]  # model.epochs: not in their slice
    # train reads the whole spec (the pipeline's spec_json) and the run URI: never reused
    assert base["train"]["parameters"] == {
        "run_uri": {"componentInputParameter": "run_uri"},
        "spec_json": {"componentInputParameter": "spec_json"},
    }
    sliced = json.loads(base["ingest"]["parameters"]["spec_json"]["runtimeValue"]["constant"])
    assert sliced["data"]["uri"] == "builtin://breast-cancer"
    assert sliced["registration"]["modelName"] != "cancer"  # not part of the data slice


def test_caching_false_gives_every_step_the_run_uri_and_the_whole_spec() -> None:
    inputs = task_inputs(compile_spec(spec_of(caching=False)).ir_yaml)
    assert "fingerprint" not in inputs
    for step in ("ingest", "preprocess", "train"):
        params = inputs[step]["parameters"]
        assert params["run_uri"] == {"componentInputParameter": "run_uri"}
        assert params["spec_json"] == {"componentInputParameter": "spec_json"}
        assert "data_fingerprint" not in params


# --- the run store's step cache, through run_step --------------------------------------------


class Metrics:
    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def log_metric(self, metric: str, value: float) -> None:
        self.logged[metric] = value


def ingest_once(tmp_path: Path, attempt: int, spec: TrainingRunSpec) -> dict[str, Any]:
    run_dir = tmp_path / "artifacts" / "team-a" / "run-1" / f"attempt-{attempt}"
    data_json = sliced_spec_json(spec, "ingest")
    fingerprint = data_fingerprint(spec.data)
    out = tmp_path / f"out-{attempt}" / "dataset"
    summary = type("Summary", (), {"path": str(tmp_path / f"out-{attempt}" / "summary.md")})()
    run_step(
        "ingest",
        data_json,
        f"file://{run_dir}",
        {"dataset_dir": str(out)},
        summary=summary,
        fingerprint=fingerprint,
    )
    record: dict[str, Any] = json.loads((run_dir / "steps" / "ingest.json").read_text())
    record["_out"] = out
    return record


def test_the_second_attempt_reuses_ingest_from_the_run_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(RUN_URI_ENV, raising=False)
    table = tmp_path / "table.csv"
    frame = pd.DataFrame({"x": range(60), "y": [i % 2 for i in range(60)]})
    frame.to_csv(table, index=False)
    spec = spec_of(**{"data": {"uri": f"file://{table}", "target": "y"}})
    first = ingest_once(tmp_path, 1, spec)
    second = ingest_once(tmp_path, 2, spec)
    assert (first["cached"], second["cached"]) == (False, True)
    assert first["cacheKey"] == second["cacheKey"]
    assert second["data"] == first["data"]
    assert second["data"]["rows"] == 60
    assert second["metrics"] == first["metrics"]
    for name in ("train.parquet", "schema.json"):
        assert (second["_out"] / name).read_bytes() == (first["_out"] / name).read_bytes()
    markers = list((tmp_path / "artifacts" / "team-a" / ".cache").glob("ingest/*/COMPLETE"))
    assert len(markers) == 1
    frame.iloc[:-1].to_csv(table, index=False)  # one row fewer: a new fingerprint, a miss
    third = ingest_once(tmp_path, 3, spec_of(**{"data": {"uri": f"file://{table}", "target": "y"}}))
    assert third["cached"] is False
    assert third["data"]["fingerprint"] != first["data"]["fingerprint"]
    assert third["data"]["rows"] == 59


def test_without_a_run_uri_the_records_travel_and_are_adopted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a Kubeflow cluster the cached steps have no run URI: their records ride in their
    output directories, and the first step with a run URI writes them into the run directory."""
    monkeypatch.delenv(RUN_URI_ENV, raising=False)
    table = tmp_path / "table.csv"
    pd.DataFrame({"x": range(200), "y": [i % 2 for i in range(200)]}).to_csv(table, index=False)
    spec = spec_of(**{"data": {"uri": f"file://{table}", "target": "y"}})
    fingerprint = data_fingerprint(spec.data)
    raw, prepared = tmp_path / "raw", tmp_path / "prepared"
    run_step(
        "ingest",
        sliced_spec_json(spec, "ingest"),
        "",
        {"dataset_dir": str(raw)},
        fingerprint=fingerprint,
    )
    paths = {
        "raw_dir": str(raw),
        "prepared_dir": str(prepared),
        "report_html": str(tmp_path / "report.html"),
    }
    run_step("preprocess", sliced_spec_json(spec, "preprocess"), "", paths, fingerprint=fingerprint)
    assert sorted(p.name for p in (prepared / ".records").iterdir()) == [
        "ingest.json",
        "preprocess.json",
    ]
    run_dir = tmp_path / "artifacts" / "team-a" / "run-1" / "attempt-1"
    adopt_records(f"file://{run_dir}", {"prepared_dir": prepared, "raw_dir": None})
    ingest = json.loads((run_dir / "steps" / "ingest.json").read_text())
    assert ingest["adopted"] is True
    assert ingest["state"] == "Succeeded"
    assert ingest["data"]["fingerprint"] == fingerprint
    assert ingest["data"]["rows"] == 200
    assert json.loads((run_dir / "steps" / "preprocess.json").read_text())["state"] == "Succeeded"
    # a record the run directory already has (the local runner's) is left alone
    (run_dir / "steps" / "ingest.json").write_text('{"step": "ingest", "state": "Running"}')
    adopt_records(f"file://{run_dir}", {"prepared_dir": prepared})
    assert json.loads((run_dir / "steps" / "ingest.json").read_text())["state"] == "Running"


def test_the_key_holds_the_pipeline_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """What older code computed is never reused by newer code (KFP's key holds the image)."""
    from kubeloop_pipelines import step_cache

    before = step_cache.step_key("ingest", "{}", "sha256:x")
    monkeypatch.setattr(step_cache, "code_fingerprint", lambda: "another version")
    assert step_cache.step_key("ingest", "{}", "sha256:x") != before
