"""TrainingRun spec → KFP v2 pipeline → IR YAML, deterministically.

The same spec (with the same image and Kueue queue) always compiles to byte-identical IR, so
``spec_hash`` (the sha256 of the IR) says whether a run must start again. The spec itself is
baked into the IR as the default of the ``spec_json`` parameter (canonical JSON: camelCase,
defaults filled, keys sorted), so the IR alone describes the run; ``run_uri`` is the one
argument given at submission.

Caching that hits: with ``spec.caching`` the cached steps (``step_cache.SPEC_SLICES``: ingest,
preprocess) get content-addressed inputs only — their *spec slice* (the fields they read, as
canonical JSON) and the data fingerprint, the output of an uncached ``fingerprint`` task that
hashes the data first — and no ``run_uri``: KFP derives a task's cache key from its component
and input values, so an input that differs per attempt would make every key new. The run URI
reaches them from the environment instead (``step_runner.RUN_URI_ENV``, set by the local
runner). A Kubeflow cluster cannot put a per-run value into a task's environment, so there they
run without it: their outputs are KFP artifacts (which later steps take as inputs), not paths
under the run URI, and their progress records travel inside those artifacts until the first
step with a run URI writes them into the run directory (``step_runner.carry_records``).
With ``caching: false`` every step takes the whole spec and the run URI.

What varies in KFP's compiled YAML: nothing time- or path-dependent in kfp 2.17 (it dumps with
sorted keys; ``sdkVersion`` names the kfp release, which is fine); the tests compile in two
processes with different working directories and hash seeds to keep it that way.

Pipeline: ingest → preprocess → [tune] → train → [optimize] → evaluate → [explain] → register,
the last one only when evaluate's ``gates_passed`` is true. Every task gets its step's display
name (``kubeloop.contract.steps.DISPLAY_NAMES``: executors map it back to the step with
``step_of_task``), the spec's caching and retries (backoff 10 s, doubling), and the CPU/memory
of ``spec.resources``, its node selector and tolerations; the GPU goes to tune and train only
(see ``accelerator_resource``). With a Kueue queue, every pod carries
``kueue.x-k8s.io/queue-name``.

(No ``from __future__ import annotations``: KFP reads the pipeline function's annotations.)
"""

import hashlib
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp import compiler as kfp_compiler
from kfp import dsl
from kfp import kubernetes as kfp_kubernetes

from kubeloop.api.training_run import TrainingRunSpec
from kubeloop.contract.labels import KUEUE_QUEUE_LABEL
from kubeloop.contract.steps import DISPLAY_NAMES
from kubeloop_pipelines import kfp_caller_lookup
from kubeloop_pipelines.components import DEFAULT_IMAGE, StepComponents, step_components
from kubeloop_pipelines.step_cache import canonical_json, sliced_spec_json

kfp_caller_lookup.install()  # kfp asks inspect.stack() in every task setter (see module)

__all__ = [
    "DEFAULT_IMAGE",
    "GPU_STEPS",
    "CompiledPipeline",
    "accelerator_resource",
    "build_pipeline",
    "canonical_spec_json",
    "compile_spec",
    "pipeline_name",
    "selected_steps",
]

GPU_STEPS = frozenset({"tune", "train"})
RETRY_BACKOFF = "10s"
RETRY_BACKOFF_FACTOR = 2.0
RETRY_BACKOFF_MAX = "3600s"
GATES_CONDITION = "gates-passed"
GATES_OUTPUT = "Output"  # evaluate's bool return value: gates_passed (see components.py)
# The task that fingerprints the data for the cached steps: no step of its own (step_of_task
# gives ''), never cached, the data credentials of ingest.
FINGERPRINT_DISPLAY_NAME = "Fingerprint data"
# data.credentialsSecret in the ingest step's pod: the files here, these keys as variables.
CREDENTIALS_MOUNT = "/var/run/secrets/kubeloop/data"
AWS_CREDENTIAL_KEYS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
)

# KFP builds a pipeline inside a process-global context (the "default pipeline"), so two
# compilations in two threads (asyncio.to_thread in the operator) would mix their tasks.
_COMPILE_LOCK = threading.Lock()


@dataclass(frozen=True)
class CompiledPipeline:
    """A compiled TrainingRun: the IR to submit and what identifies it."""

    ir_yaml: str
    spec_hash: str  # sha256 hex of ir_yaml
    spec_json: str  # the canonical spec baked into the IR
    steps: tuple[str, ...]  # the steps it runs, in order
    pipeline_name: str


def canonical_spec_json(spec: TrainingRunSpec) -> str:
    """camelCase, defaults filled, keys sorted, no spaces: equal specs give equal text."""
    return canonical_json(spec)


def optimizes(spec: TrainingRunSpec) -> bool:
    opt = spec.optimization
    return opt.pruning > 0 or opt.quantize_int8 or bool(opt.distill_hidden_layers)


def selected_steps(spec: TrainingRunSpec) -> tuple[str, ...]:
    """The steps the spec asks for, in pipeline order."""
    steps = ["ingest", "preprocess"]
    if spec.tuning is not None:
        steps.append("tune")
    steps.append("train")
    if optimizes(spec):
        steps.append("optimize")
    steps.append("evaluate")
    if spec.explanation.method != "none":
        steps.append("explain")
    steps.append("register")
    return tuple(steps)


def pipeline_name(spec: TrainingRunSpec) -> str:
    return f"kubeloop-{spec.registration.model_name}"


def accelerator_resource(spec: TrainingRunSpec) -> str:
    """What ``set_accelerator_type`` gets. Kubeflow Pipelines' driver puts it verbatim into the
    pod's resource limits (``limits[<type>] = <count>``), so it must be an extended resource
    name: ``resources.acceleratorType`` when it is one (``vendor/name``), else
    ``resources.gpuResource``. A model name such as ``NVIDIA_H100`` (Vertex AI's vocabulary)
    would ask for a resource no node has; nodes of a model are chosen with ``nodeSelector``."""
    accelerator_type = spec.resources.accelerator_type
    return accelerator_type if "/" in accelerator_type else spec.resources.gpu_resource


def _configure(task: Any, step: str, spec: TrainingRunSpec, kueue_queue: str) -> Any:
    """Display name, caching, retries, resources and placement of one task."""
    res = spec.resources
    if step == "fingerprint":
        task.set_display_name(FINGERPRINT_DISPLAY_NAME)
        task.set_caching_options(False)
    else:
        task.set_display_name(DISPLAY_NAMES[step])
        task.set_caching_options(spec.caching)
    task.set_retry(
        num_retries=spec.retries,
        backoff_duration=RETRY_BACKOFF,
        backoff_factor=RETRY_BACKOFF_FACTOR,
        backoff_max_duration=RETRY_BACKOFF_MAX,
    )
    _quantity(task.set_cpu_request, res.cpu, "resources.cpu", "e.g. 500m or 2")
    _quantity(task.set_cpu_limit, res.cpu, "resources.cpu", "e.g. 500m or 2")
    _quantity(task.set_memory_request, res.memory, "resources.memory", "e.g. 512Mi or 4Gi")
    _quantity(task.set_memory_limit, res.memory, "resources.memory", "e.g. 512Mi or 4Gi")
    if step in GPU_STEPS and res.gpu > 0:
        task.set_accelerator_type(accelerator_resource(spec))
        task.set_accelerator_limit(res.gpu)
    for key, value in sorted(res.node_selector.items()):
        kfp_kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for tol in res.tolerations:
        kfp_kubernetes.add_toleration(
            task,
            key=tol.key or None,
            operator=tol.operator,
            value=tol.value or None,
            effect=tol.effect or None,
            toleration_seconds=tol.toleration_seconds,
        )
    if kueue_queue:
        kfp_kubernetes.add_pod_label(task, label_key=KUEUE_QUEUE_LABEL, label_value=kueue_queue)
    return task


def _with_credentials(task: Any, spec: TrainingRunSpec) -> Any:
    """The ingest step (the only one that reads the data URIs) gets ``data.credentialsSecret``
    of the run's own namespace: mounted at ``CREDENTIALS_MOUNT``, its AWS_* keys as environment
    variables (each optional), and for gs:// data ``key.json`` as the Google credentials."""
    secret = spec.data.credentials_secret
    if not secret:
        return task
    kfp_kubernetes.use_secret_as_volume(task, secret_name=secret, mount_path=CREDENTIALS_MOUNT)
    keys = {key: key for key in AWS_CREDENTIAL_KEYS}
    kfp_kubernetes.use_secret_as_env(
        task, secret_name=secret, secret_key_to_env=keys, optional=True
    )
    uris = [spec.data.uri, *(e.uri for e in spec.data.extra)]
    if any(u.startswith("gs://") for u in uris):
        task.set_env_variable("GOOGLE_APPLICATION_CREDENTIALS", f"{CREDENTIALS_MOUNT}/key.json")
    return task


def _quantity(setter: Callable[[str], Any], value: str, field: str, accepted: str) -> None:
    try:
        setter(value)
    except ValueError as exc:
        raise ValueError(
            f"{field}: {value!r} is not accepted by Kubeflow Pipelines ({accepted}): {exc}"
        ) from None


def build_pipeline(
    spec: TrainingRunSpec, *, image: str = DEFAULT_IMAGE, kueue_queue: str = ""
) -> Any:
    """The KFP pipeline (a ``GraphComponent``) for ``spec``; see the module docstring."""
    c: StepComponents = step_components(image)
    spec_default = canonical_spec_json(spec)
    steps = selected_steps(spec)
    queue = kueue_queue or spec.resources.queue_name or ""

    def task(step: str, created: Any) -> Any:
        return _configure(created, step, spec, queue)

    def training_pipeline(run_uri: str, spec_json: str = spec_default) -> None:
        common = {"spec_json": spec_json, "run_uri": run_uri}
        ingest_args: dict[str, Any] = common
        preprocess_args: dict[str, Any] = common
        if spec.caching:  # content-addressed inputs (see the module docstring)
            data_slice = sliced_spec_json(spec, "ingest")
            fingerprint = _with_credentials(
                task("fingerprint", c.fingerprint(spec_json=data_slice)), spec
            ).output
            ingest_args = {"spec_json": data_slice, "data_fingerprint": fingerprint}
            preprocess_args = {
                "spec_json": sliced_spec_json(spec, "preprocess"),
                "data_fingerprint": fingerprint,
            }
        ingest = _with_credentials(task("ingest", c.ingest(**ingest_args)), spec)
        prepared = task(
            "preprocess", c.preprocess(**preprocess_args, raw=ingest.outputs["dataset"])
        ).outputs["prepared"]
        params = None
        if "tune" in steps:
            params = task("tune", c.tune(**common, prepared=prepared)).outputs["params"]
        train_args: dict[str, Any] = {"prepared": prepared}
        if params is not None:
            train_args["params"] = params
        model = task("train", c.train(**common, **train_args)).outputs["model"]
        if "optimize" in steps:
            model = task("optimize", c.optimize(**common, prepared=prepared, model=model)).outputs[
                "optimized"
            ]
        evaluate = task("evaluate", c.evaluate(**common, prepared=prepared, model=model))
        last = evaluate
        if "explain" in steps:
            last = task("explain", c.explain(**common, prepared=prepared, model=model))
            last.after(evaluate)
        passed = evaluate.outputs[GATES_OUTPUT]
        with dsl.If(passed == True, name=GATES_CONDITION):  # noqa: E712 (a KFP expression)
            register = c.register(
                **common,
                raw=ingest.outputs["dataset"],
                model=model,
                evaluation=evaluate.outputs["evaluation"],
            )
            task("register", register).after(last)

    training_pipeline.__doc__ = (
        f"kubeloop TrainingRun for model {spec.registration.model_name}: {' → '.join(steps)}."
    )
    return dsl.pipeline(name=pipeline_name(spec))(training_pipeline)


def compile_spec(
    spec: TrainingRunSpec, *, image: str = DEFAULT_IMAGE, kueue_queue: str = ""
) -> CompiledPipeline:
    """Compile ``spec`` into KFP IR YAML (deterministic; see the module docstring).

    Raises ``ValueError`` naming the spec field when KFP refuses a value (e.g. a CPU quantity).
    """
    with _COMPILE_LOCK, tempfile.TemporaryDirectory(prefix="kubeloop-compile-") as tmp:
        package = Path(tmp) / "pipeline.yaml"
        pipeline = build_pipeline(spec, image=image, kueue_queue=kueue_queue)
        kfp_compiler.Compiler().compile(pipeline, package_path=str(package))
        ir_yaml = package.read_text()
        if tmp in ir_yaml:  # defensive: the IR must not depend on where it was compiled
            ir_yaml = ir_yaml.replace(tmp, "")
    return CompiledPipeline(
        ir_yaml=ir_yaml,
        spec_hash=hashlib.sha256(ir_yaml.encode()).hexdigest(),
        spec_json=canonical_spec_json(spec),
        steps=selected_steps(spec),
        pipeline_name=pipeline_name(spec),
    )
