"""A FAKE Kubeflow Pipelines API server, at the HTTP boundary, for the ``kfp`` executor's tests.

The real KFP API server needs MySQL, Argo Workflows and an object store, which cannot run on a
test machine. This fake serves the v2beta1 REST endpoints that ``kfp.Client`` calls for
``KfpExecutor`` — and only those — on 127.0.0.1 (a random port), backed by dictionaries:

- ``GET  /apis/v2beta1/healthz``
- ``GET|POST /apis/v2beta1/experiments``, ``GET /apis/v2beta1/experiments/{id}``
- ``GET|POST /apis/v2beta1/runs``, ``GET /apis/v2beta1/runs/{id}``,
  ``POST /apis/v2beta1/runs/{id}:terminate``

It records every request (``requests``), refuses a run whose ``pipeline_spec`` is not real KFP IR
(it must parse into ``kfp_pipeline_spec``'s ``PipelineSpec``/``PlatformSpec`` protos and have a
``pipelineInfo`` name, a root DAG with tasks and executors), and lets the test drive what the
cluster would do: ``set_state(run_id, "RUNNING")``, ``fail_task(run_id, "Train model", "OOM")``,
``fail_next("POST", "/apis/v2beta1/runs", 503)``. Nothing runs: runs stay PENDING until told.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

API = "/apis/v2beta1"
BODY = web.RequestKey("body", object)  # the parsed JSON body, set by the middleware
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELED", "SKIPPED"})


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    body: Any


@dataclass
class _Fault:
    method: str
    path_prefix: str
    status: int
    times: int
    message: str


@dataclass
class FakeKfpApi:
    """The fake server (see the module docstring). Use as ``async with FakeKfpApi() as fake``."""

    multi_user: bool = False
    requests: list[Recorded] = field(default_factory=list)
    experiments: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    _faults: list[_Fault] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _runner: web.AppRunner | None = None
    url: str = ""

    # --- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> FakeKfpApi:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get(f"{API}/healthz", self._healthz)
        app.router.add_get(f"{API}/experiments", self._list_experiments)
        app.router.add_post(f"{API}/experiments", self._create_experiment)
        app.router.add_get(f"{API}/experiments/{{experiment_id}}", self._get_experiment)
        app.router.add_post(f"{API}/runs/{{run_id}}:terminate", self._terminate_run)
        app.router.add_get(f"{API}/runs", self._list_runs)
        app.router.add_post(f"{API}/runs", self._create_run)
        app.router.add_get(f"{API}/runs/{{run_id}}", self._get_run)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # --- what a test drives ----------------------------------------------------------------

    def fail_next(
        self, method: str, path_prefix: str, status: int, *, times: int = 1, message: str = ""
    ) -> None:
        """Answer the next ``times`` matching requests with ``status`` (e.g. 503)."""
        text = message or f"fake failure {status}"
        self._faults.append(_Fault(method.upper(), path_prefix, status, times, text))

    def set_state(self, run_id: str, state: str) -> None:
        run = self.runs[run_id]
        run["state"] = state
        if state in TERMINAL:
            run["finished_at"] = _now()

    def fail_task(self, run_id: str, task_display_name: str, message: str) -> None:
        """The run fails because the task shown as ``task_display_name`` failed."""
        run = self.runs[run_id]
        error = {"code": 2, "message": message}
        leaf = {
            "run_id": run_id,
            "task_id": f"task-{next(self._ids)}",
            "display_name": task_display_name,
            "state": "FAILED",
            "error": error,
            "end_time": _now(),
            "pod_name": f"{run_id}-system-container-impl-1",
        }
        root = {
            "run_id": run_id,
            "task_id": f"task-{next(self._ids)}",
            "display_name": "root",
            "state": "FAILED",
            "error": {"code": 2, "message": "a child task failed"},
            "child_tasks": [{"task_id": leaf["task_id"]}],
        }
        run["run_details"] = {"task_details": [root, leaf]}
        run["error"] = {"code": 2, "message": f"run failed: {message}"}
        self.set_state(run_id, "FAILED")

    def runs_named(self, display_name: str) -> list[dict[str, Any]]:
        return [r for r in self.runs.values() if r["display_name"] == display_name]

    def calls(self, method: str, path_prefix: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and r.path.startswith(path_prefix)]

    # --- plumbing ----------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body: Any = None
        if request.can_read_body:
            text = await request.text()
            try:
                body = json.loads(text)
            except ValueError:
                body = text
        self.requests.append(Recorded(request.method, request.path, dict(request.query), body))
        request[BODY] = body
        for fault in self._faults:
            if (
                fault.times > 0
                and fault.method == request.method
                and request.path.startswith(fault.path_prefix)
            ):
                fault.times -= 1
                return _error(fault.status, fault.message)
        response: web.StreamResponse = await handler(request)
        return response

    def _new_id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids):04d}"

    # --- handlers ----------------------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"multi_user": self.multi_user, "pipeline_store": "database"})

    async def _list_experiments(self, request: web.Request) -> web.Response:
        namespace = request.query.get("namespace", "")
        found = [
            e
            for e in self.experiments.values()
            if _matches(e, request.query.get("filter"))
            and (not namespace or e["namespace"] == namespace)
        ]
        return web.json_response({"experiments": found, "total_size": len(found)})

    async def _create_experiment(self, request: web.Request) -> web.Response:
        body = _body(request)
        name = str(body.get("display_name") or "")
        if not name:
            return _error(400, "experiment display_name is required")
        namespace = str(body.get("namespace") or "")
        if self.multi_user and not namespace:
            return _error(400, "multi-user mode: the experiment needs a namespace")
        if any(
            e["display_name"] == name and e["namespace"] == namespace
            for e in self.experiments.values()
        ):
            return _error(409, f"experiment {name!r} already exists")
        experiment = {
            "experiment_id": self._new_id("exp"),
            "display_name": name,
            "description": body.get("description") or "",
            "namespace": namespace,
            "created_at": _now(),
            "storage_state": "AVAILABLE",
        }
        self.experiments[experiment["experiment_id"]] = experiment
        return web.json_response(experiment)

    async def _get_experiment(self, request: web.Request) -> web.Response:
        experiment = self.experiments.get(request.match_info["experiment_id"])
        if experiment is None:
            return _error(404, "experiment not found")
        return web.json_response(experiment)

    async def _list_runs(self, request: web.Request) -> web.Response:
        experiment_id = request.query.get("experiment_id", "")
        found = [
            _public(r)
            for r in self.runs.values()
            if (not experiment_id or r["experiment_id"] == experiment_id)
            and _matches(r, request.query.get("filter"))
        ]
        return web.json_response({"runs": found, "total_size": len(found)})

    async def _create_run(self, request: web.Request) -> web.Response:
        body = _body(request)
        experiment_id = str(body.get("experiment_id") or "")
        if experiment_id not in self.experiments:
            return _error(404, f"experiment {experiment_id!r} not found")
        try:
            pipeline_name = validate_pipeline_spec(body.get("pipeline_spec"))
        except ValueError as exc:
            return _error(400, f"invalid pipeline spec: {exc}")
        run = {
            "run_id": self._new_id("run"),
            "experiment_id": experiment_id,
            "display_name": str(body.get("display_name") or ""),
            "pipeline_spec": body["pipeline_spec"],
            "runtime_config": body.get("runtime_config") or {},
            "service_account": body.get("service_account") or "",
            "created_at": _now(),
            "state": "PENDING",
            "storage_state": "AVAILABLE",
            "pipeline_name": pipeline_name,
        }
        self.runs[run["run_id"]] = run
        return web.json_response(_public(run))

    async def _get_run(self, request: web.Request) -> web.Response:
        run = self.runs.get(request.match_info["run_id"])
        if run is None:
            return _error(404, "run not found")
        return web.json_response(_public(run))

    async def _terminate_run(self, request: web.Request) -> web.Response:
        run = self.runs.get(request.match_info["run_id"])
        if run is None:
            return _error(404, "run not found")
        if run["state"] in TERMINAL:
            return _error(400, f"run {run['run_id']} already finished ({run['state']})")
        self.set_state(run["run_id"], "CANCELED")
        return web.json_response({})


def validate_pipeline_spec(document: Any) -> str:
    """Check that ``document`` is KFP IR as kfp.Client submits it; return the pipeline name."""
    if not isinstance(document, dict):
        raise ValueError("pipeline_spec must be an object")
    platform: Any = None
    if "pipeline_spec" in document:  # {pipeline_spec, platform_spec} when there is a platform
        platform = document.get("platform_spec")
        document = document["pipeline_spec"]
    try:
        spec = json_format.ParseDict(document, pipeline_spec_pb2.PipelineSpec())
        if platform is not None:
            json_format.ParseDict(platform, pipeline_spec_pb2.PlatformSpec())
    except json_format.ParseError as exc:
        raise ValueError(str(exc)) from None
    if not spec.pipeline_info.name:
        raise ValueError("pipelineInfo.name is missing")
    if not spec.root.dag.tasks:
        raise ValueError("root.dag has no tasks")
    if not spec.deployment_spec or "executors" not in spec.deployment_spec:
        raise ValueError("deploymentSpec.executors is missing")
    if not spec.schema_version:
        raise ValueError("schemaVersion is missing")
    return str(spec.pipeline_info.name)


def _matches(item: dict[str, Any], filter_json: str | None) -> bool:
    """The subset of filter.proto the client sends: EQUALS on string keys."""
    if not filter_json:
        return True
    for predicate in json.loads(filter_json).get("predicates", []):
        if predicate.get("operation") not in (1, "EQUALS"):
            raise ValueError(f"the fake supports EQUALS only: {predicate}")
        value = predicate.get("stringValue", predicate.get("string_value"))
        if item.get(predicate["key"]) != value:
            return False
    return True


def _body(request: web.Request) -> dict[str, Any]:
    body = request[BODY]
    return body if isinstance(body, dict) else {}


def _public(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k != "pipeline_name"}


def _error(status: int, message: str) -> web.Response:
    code = {400: 3, 404: 5, 409: 6, 429: 8, 503: 14}.get(status, 13)
    return web.json_response(
        {"error": message, "code": code, "message": message, "details": []}, status=status
    )
