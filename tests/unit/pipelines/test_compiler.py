"""The TrainingRun compiler: deterministic KFP IR, the steps a spec asks for, and the task
settings (retries, caching, resources, GPU, placement, Kueue) as KFP writes them into the IR."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeloop.api.training_run import TrainingRunSpec
from kubeloop.contract.labels import KUEUE_QUEUE_LABEL
from kubeloop.contract.steps import DISPLAY_NAMES, step_of_task
from kubeloop_pipelines.compiler import CompiledPipeline, canonical_spec_json, compile_spec
from kubeloop_pipelines.contract import parse_spec
from tests.conftest import ROOT

BASE: dict[str, Any] = {
    "data": {"uri": "builtin://breast-cancer", "target": "target"},
    "model": {"epochs": 3},
    "explanation": {"method": "none"},
    "registration": {"modelName": "cancer"},
}
FULL: dict[str, Any] = {
    **BASE,
    "tuning": {
        "maxTrials": 4,
        "searchSpace": [{"name": "learningRate", "type": "float", "min": 1e-4, "max": 1e-2}],
    },
    "explanation": {"method": "shap", "samples": 50},
    "optimization": {"quantizeInt8": True, "pruning": 0.5},
    "resources": {
        "cpu": "2",
        "memory": "4Gi",
        "gpu": 2,
        "acceleratorType": "NVIDIA_H100",
        "nodeSelector": {"pool": "gpu", "zone": "a"},
        "tolerations": [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {"key": "team", "value": "ml", "effect": "NoExecute", "tolerationSeconds": 60},
        ],
    },
    "retries": 3,
    "caching": False,
}


def spec_of(doc: dict[str, Any], **changes: Any) -> TrainingRunSpec:
    merged = json.loads(json.dumps(doc))
    for dotted, value in changes.items():
        target = merged
        *parents, leaf = dotted.split(".")
        for key in parents:
            target = target.setdefault(key, {})
        target[leaf] = value
    return TrainingRunSpec.model_validate(merged)


def documents(compiled: CompiledPipeline) -> tuple[dict[str, Any], dict[str, Any]]:
    docs = list(yaml.safe_load_all(compiled.ir_yaml))
    return docs[0], (docs[1] if len(docs) > 1 else {})


def tasks(pipeline: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every primitive task of the IR by name, the condition's too."""
    found: dict[str, dict[str, Any]] = {}
    dags = [pipeline["root"]["dag"]] + [
        c["dag"] for c in pipeline["components"].values() if "dag" in c
    ]
    for dag in dags:
        for name, task in dag["tasks"].items():
            if not name.startswith("condition"):
                found[name] = task
    return found


def executors(pipeline: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name.removeprefix("exec-"): spec["container"]
        for name, spec in pipeline["deploymentSpec"]["executors"].items()
    }


@pytest.fixture(scope="module")
def full() -> CompiledPipeline:
    return compile_spec(spec_of(FULL), image="registry.local/training:dev", kueue_queue="team-a")


def test_same_spec_compiles_to_the_same_bytes() -> None:
    first, second = compile_spec(spec_of(FULL)), compile_spec(spec_of(FULL))
    assert first.ir_yaml == second.ir_yaml
    assert first.spec_hash == second.spec_hash
    assert len(first.spec_hash) == 64


def test_ir_does_not_depend_on_the_process(tmp_path: Path) -> None:
    """Another process, working directory and hash seed: the same IR (nothing time- or
    path-dependent in it)."""
    script = (
        "import json, sys\n"
        "from kubeloop.api.training_run import TrainingRunSpec\n"
        "from kubeloop_pipelines.compiler import compile_spec\n"
        "spec = TrainingRunSpec.model_validate(json.loads(sys.argv[1]))\n"
        "print(compile_spec(spec, kueue_queue='team-a').spec_hash)\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(FULL)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert out.stdout.strip() == compile_spec(spec_of(FULL), kueue_queue="team-a").spec_hash


@pytest.mark.parametrize(
    "change",
    [
        {"model.epochs": 4},
        {"data.split.seed": 1},
        {"retries": 1},
        {"resources.memory": "8Gi"},
        {"explanation.method": "permutation"},
    ],
)
def test_a_spec_change_changes_the_hash(change: dict[str, Any]) -> None:
    assert compile_spec(spec_of(BASE, **change)).spec_hash != compile_spec(spec_of(BASE)).spec_hash


def test_image_and_queue_are_part_of_the_hash() -> None:
    spec = spec_of(BASE)
    hashes = {
        compile_spec(spec).spec_hash,
        compile_spec(spec, image="registry.local/training:dev").spec_hash,
        compile_spec(spec, kueue_queue="team-a").spec_hash,
    }
    assert len(hashes) == 3


def test_equal_specs_written_differently_compile_alike() -> None:
    """Map order in the manifest does not matter (the spec JSON is canonical)."""
    a = spec_of(BASE, **{"resources.nodeSelector": {"a": "1", "b": "2"}})
    b = spec_of(BASE, **{"resources.nodeSelector": {"b": "2", "a": "1"}})
    assert compile_spec(a).spec_hash == compile_spec(b).spec_hash


MINIMAL = ("ingest", "preprocess", "train", "evaluate", "register")
OPTIMIZED = ("ingest", "preprocess", "train", "optimize", "evaluate", "register")


@pytest.mark.parametrize(
    ("change", "steps"),
    [
        ({}, MINIMAL),
        (
            {"tuning": FULL["tuning"]},
            ("ingest", "preprocess", "tune", "train", "evaluate", "register"),
        ),
        ({"optimization.pruning": 0.3}, OPTIMIZED),
        ({"optimization.quantizeInt8": True}, OPTIMIZED),
        ({"optimization.distillHiddenLayers": [8]}, OPTIMIZED),
        (
            {"explanation.method": "shap"},
            ("ingest", "preprocess", "train", "evaluate", "explain", "register"),
        ),
    ],
)
def test_steps_follow_the_spec(change: dict[str, Any], steps: tuple[str, ...]) -> None:
    compiled = compile_spec(spec_of(BASE, **change))
    assert compiled.steps == steps
    pipeline, _ = documents(compiled)
    # caching (the default) adds the uncached task that fingerprints the data (no step)
    assert set(tasks(pipeline)) == {"fingerprint", *steps}


def test_the_full_pipeline_in_order(full: CompiledPipeline) -> None:
    assert full.steps == (
        "ingest", "preprocess", "tune", "train", "optimize", "evaluate", "explain", "register"
    )  # fmt: skip
    pipeline, _ = documents(full)
    found = tasks(pipeline)
    assert found["train"]["dependentTasks"] == ["preprocess", "tune"]
    assert found["train"]["inputs"]["artifacts"]["params"]["taskOutputArtifact"] == {
        "outputArtifactKey": "params",
        "producerTask": "tune",
    }
    # evaluate, explain and register see the optimised model.
    for step in ("evaluate", "explain"):
        model = found[step]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]
        assert model == {"outputArtifactKey": "optimized", "producerTask": "optimize"}
    assert "evaluate" in found["explain"]["dependentTasks"]


def test_register_runs_only_when_the_gates_pass(full: CompiledPipeline) -> None:
    pipeline, _ = documents(full)
    root = pipeline["root"]["dag"]["tasks"]
    (condition,) = [t for name, t in root.items() if name.startswith("condition")]
    assert condition["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--evaluate-Output'] == true"
    )
    assert sorted(condition["dependentTasks"]) == ["evaluate", "explain", "ingest", "optimize"]
    inner = pipeline["components"][condition["componentRef"]["name"]]["dag"]["tasks"]
    assert list(inner) == ["register"]
    evaluate = pipeline["components"]["comp-evaluate"]["outputDefinitions"]
    assert evaluate["parameters"]["Output"]["parameterType"] == "BOOLEAN"
    assert "classification" in evaluate["artifacts"]


def test_every_task_has_display_name_retries_and_caching(full: CompiledPipeline) -> None:
    pipeline, _ = documents(full)
    for name, task in tasks(pipeline).items():
        assert task["taskInfo"]["name"] == DISPLAY_NAMES[name]
        assert task["taskInfo"]["name"].split()[0].lower() == name
        assert step_of_task(task["taskInfo"]["name"]) == name  # how executors find the step
        assert task["retryPolicy"] == {
            "maxRetryCount": 3,
            "backoffDuration": "10s",
            "backoffFactor": 2.0,
            "backoffMaxDuration": "3600s",
        }
        assert task["cachingOptions"] == {}  # caching: false
    cached = tasks(documents(compile_spec(spec_of(BASE)))[0])
    assert cached.pop("fingerprint")["cachingOptions"] == {}  # it must see the data change
    assert all(t["cachingOptions"] == {"enableCache": True} for t in cached.values())


def test_resources_and_the_gpu_on_tune_and_train_only(full: CompiledPipeline) -> None:
    pipeline, _ = documents(full)
    for name, container in executors(pipeline).items():
        assert container["image"] == "registry.local/training:dev"
        res = container["resources"]
        assert (res["resourceCpuRequest"], res["resourceCpuLimit"]) == ("2", "2")
        assert (res["resourceMemoryRequest"], res["resourceMemoryLimit"]) == ("4Gi", "4Gi")
        if name in ("tune", "train"):
            # KFP's driver sets limits[resourceType]: a model name (NVIDIA_H100) is no resource.
            assert res["accelerator"]["resourceType"] == "nvidia.com/gpu"
            assert res["accelerator"]["resourceCount"] == "2"
        else:
            assert "accelerator" not in res


@pytest.mark.parametrize(
    ("resources", "accelerator"),
    [
        ({"gpuResource": "amd.com/gpu"}, "amd.com/gpu"),
        ({"acceleratorType": "nvidia.com/mig-1g.10gb"}, "nvidia.com/mig-1g.10gb"),
        ({"acceleratorType": "NVIDIA_H100", "gpuResource": "nvidia.com/gpu"}, "nvidia.com/gpu"),
    ],
)
def test_the_accelerator_is_an_extended_resource(
    resources: dict[str, str], accelerator: str
) -> None:
    spec = spec_of(BASE, resources={"gpu": 1, **resources})
    train = executors(documents(compile_spec(spec))[0])["train"]
    assert train["resources"]["accelerator"]["resourceType"] == accelerator


def test_placement_and_kueue_label_on_every_pod(full: CompiledPipeline) -> None:
    _, platform = documents(full)
    configs = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(configs) == {f"exec-{step}" for step in full.steps}
    for config in configs.values():
        assert config["nodeSelector"] == {"labels": {"pool": "gpu", "zone": "a"}}
        assert config["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {
                "key": "team",
                "operator": "Equal",
                "value": "ml",
                "effect": "NoExecute",
                "tolerationSeconds": "60",
            },
        ]
        assert config["podMetadata"]["labels"] == {KUEUE_QUEUE_LABEL: "team-a"}


def test_no_platform_config_without_placement_or_queue() -> None:
    _, platform = documents(compile_spec(spec_of(BASE)))
    assert platform == {}


def test_the_spec_queue_name_when_the_operator_sets_none() -> None:
    spec = spec_of(BASE, **{"resources.queueName": "gpu-queue"})
    _, platform = documents(compile_spec(spec))
    for config in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values():
        assert config["podMetadata"]["labels"] == {KUEUE_QUEUE_LABEL: "gpu-queue"}


def test_the_ir_carries_the_spec_and_it_round_trips(full: CompiledPipeline) -> None:
    pipeline, _ = documents(full)
    params = pipeline["root"]["inputDefinitions"]["parameters"]
    assert params["run_uri"] == {"parameterType": "STRING"}
    default = params["spec_json"]["defaultValue"]
    assert default == full.spec_json == canonical_spec_json(spec_of(FULL))
    assert parse_spec(default) == spec_of(FULL)
    assert pipeline["pipelineInfo"]["name"] == full.pipeline_name == "kubeloop-cancer"


def test_a_value_kfp_refuses_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"resources\.memory: '1\.5Gi'"):
        compile_spec(spec_of(BASE, **{"resources.memory": "1.5Gi"}))


def test_compile_takes_under_a_second() -> None:
    spec = spec_of(FULL)
    compile_spec(spec, kueue_queue="team-a")  # warm-up: components built, imports done
    times = []
    for _ in range(5):
        started = time.perf_counter()
        compile_spec(spec, kueue_queue="team-a")
        times.append(time.perf_counter() - started)
    # The target is the median (one slow run on a busy machine is the machine, not the
    # compiler; ~50 ms each when quiet); the fastest run shows what the compiler costs.
    assert statistics.median(times) < 1.0, f"compile times {times}"
    assert min(times) < 0.5, f"compile times {times}"


def _platform(ir_yaml: str) -> dict[str, Any]:
    docs = list(yaml.safe_load_all(ir_yaml))
    platform = next(d for d in docs if "platforms" in d)
    executors: dict[str, Any] = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    return executors


def test_the_credentials_secret_reaches_only_the_ingest_step() -> None:
    spec = TrainingRunSpec.model_validate(
        {
            "data": {"uri": "gs://lake/t/d.csv", "target": "y", "credentialsSecret": "lake-reader"},
            "registration": {"modelName": "m"},
        }
    )
    compiled = compile_spec(spec)
    executors = _platform(compiled.ir_yaml)
    ingest = executors["exec-ingest"]
    assert ingest["secretAsVolume"][0]["secretName"] == "lake-reader"
    assert ingest["secretAsVolume"][0]["mountPath"] == "/var/run/secrets/kubeloop/data"
    env = {e["envVar"] for e in ingest["secretAsEnv"][0]["keyToEnv"]}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= env
    assert ingest["secretAsEnv"][0]["optional"] is True  # each key may be absent
    others = [name for name, e in executors.items() if "secretAsVolume" in e or "secretAsEnv" in e]
    assert others == ["exec-fingerprint", "exec-ingest"]  # the two tasks that read the data
    assert "GOOGLE_APPLICATION_CREDENTIALS" in compiled.ir_yaml  # gs:// data: the key file
    # No secret named: nothing mounted.
    plain = compile_spec(
        TrainingRunSpec.model_validate(
            {
                **spec.model_dump(by_alias=True, exclude_none=True),
                "data": {"uri": "gs://lake/t/d.csv", "target": "y"},
            }
        )
    )
    assert "lake-reader" not in plain.ir_yaml


def test_kfps_caller_lookup_is_the_cheap_one_and_words_kfps_message_the_same() -> None:
    """kfp's task setters ask ``inspect.stack()[1][3]`` for their caller's name
    (kfp_caller_lookup.py); the cheap stack gives the same name from frames alone."""
    from kfp.dsl import pipeline_task

    from kubeloop_pipelines import kfp_caller_lookup

    assert isinstance(pipeline_task.inspect, kfp_caller_lookup._CheapStack)

    def set_cpu_limit() -> str:
        return str(pipeline_task.inspect.stack()[1][3])

    def caller() -> str:
        return set_cpu_limit()

    assert caller() == "caller"  # what kfp names in "… can only be used on single-step …"
    real = [f.function for f in __import__("inspect").stack()[:3]]
    cheap = [f.function for f in pipeline_task.inspect.stack()[:3]]
    assert cheap == real
