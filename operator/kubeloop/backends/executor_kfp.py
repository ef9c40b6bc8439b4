"""The Kubeflow Pipelines executor: runs the compiled IR on a KFP API (v2beta1) via ``kfp.Client``.

- One experiment per namespace, ``kubeloop-<namespace>`` (in that namespace's profile when
  KFP runs multi-user).
- One run per attempt, named ``<namespace>.<name>.attempt-<n>``: ``submit`` looks the name up in
  the experiment before creating anything, so a repeated submit (a restarted operator, a lost
  answer) returns the existing run instead of starting a second one.
- The IR goes in as it was compiled (``run_pipeline`` with the YAML written to a temporary
  file), with the submission's arguments as runtime parameters.
- States (``V2beta1RuntimeState``): PENDING/unspecified → Pending; RUNNING, PAUSED, CANCELING →
  Running; SUCCEEDED → Succeeded; FAILED, CANCELED, SKIPPED → Failed. A failure names the task
  that failed (from the run details) and the step it ran: task display names start with the
  step's name (``compiler.DISPLAY_NAMES``).
- Deadlines: the submission's ``timeout_s`` is kept in memory; an observe past it terminates
  the run and reports Failed. (A restarted operator no longer knows the deadlines of runs it
  submitted before; the TrainingRun's own ``timeout`` is then the planner's to enforce.)

``kfp.Client`` is synchronous: every call runs in a worker thread (``asyncio.to_thread``) with
a deadline, so the event loop never waits on the API. Errors are mapped in one place: no
answer, a timeout, 5xx, 429 and 409 are temporary; other 4xx are permanent.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from kubeloop.backends.executor import (
    ExecutorError,
    RunObservation,
    RunState,
    Submission,
    run_display_name,
)
from kubeloop.contract.steps import step_of_task

T = TypeVar("T")

EXPERIMENT_PREFIX = "kubeloop-"
EQUALS = 1  # filter.proto Predicate.Operation.EQUALS
STATES: dict[str, RunState] = {
    "RUNTIME_STATE_UNSPECIFIED": "Pending",
    "PENDING": "Pending",
    "RUNNING": "Running",
    "PAUSED": "Running",
    "CANCELING": "Running",
    "SUCCEEDED": "Succeeded",
    "FAILED": "Failed",
    "CANCELED": "Failed",
    "SKIPPED": "Failed",
}
TEMPORARY_STATUSES = frozenset({408, 409, 425, 429})
# Task details that are DAGs or drivers, not a step's container.
_NOT_STEPS = ("root", "condition-", "gates-passed", "for-loop-", "exit-handler-")


def experiment_name(namespace: str) -> str:
    return f"{EXPERIMENT_PREFIX}{namespace}"


def _filter_by_name(name: str) -> str:
    return json.dumps(
        {"predicates": [{"operation": EQUALS, "key": "display_name", "stringValue": name}]}
    )


def _api_message(exc: Any) -> str:
    """The API's own error text from an ApiException (its body is google.rpc.Status JSON)."""
    body = getattr(exc, "body", None)
    if isinstance(body, bytes):
        body = body.decode(errors="replace")
    if isinstance(body, str) and body:
        try:
            data = json.loads(body)
        except ValueError:
            return body[:500]
        if isinstance(data, dict):
            return str(data.get("message") or data.get("error") or body)[:500]
    return str(getattr(exc, "reason", "") or exc)[:500]


def map_error(exc: BaseException, host: str, what: str) -> ExecutorError:
    """One mapping from what ``kfp.Client`` raises to ``ExecutorError``."""
    import urllib3
    from kfp_server_api.exceptions import ApiException

    where = f"Kubeflow Pipelines at {host}"
    if isinstance(exc, ApiException):
        status = int(exc.status or 0)
        text = _api_message(exc)
        temporary = status == 0 or status >= 500 or status in TEMPORARY_STATUSES
        return ExecutorError(f"{what}: {where} answered HTTP {status}: {text}", temporary)
    if isinstance(exc, (urllib3.exceptions.HTTPError, OSError, TimeoutError)):
        return ExecutorError(f"{what}: {where} is unreachable: {type(exc).__name__}: {exc}", True)
    return ExecutorError(f"{what}: {where}: {type(exc).__name__}: {exc}", False)


def _failed_task(run: Any) -> Any | None:
    """The failed task of a run that is a step's container (not a DAG), earliest first."""
    details = getattr(run, "run_details", None)
    tasks = list(getattr(details, "task_details", None) or [])
    failed = [
        t
        for t in tasks
        if str(getattr(t, "state", "")) == "FAILED"
        and not str(getattr(t, "display_name", "") or "").startswith(_NOT_STEPS)
    ]
    if not failed:
        return None
    leaves = [t for t in failed if not getattr(t, "child_tasks", None)] or failed
    return min(leaves, key=lambda t: str(getattr(t, "end_time", "") or ""))


def describe(run: Any) -> RunObservation:
    """A KFP run (``V2beta1Run``) as a ``RunObservation``."""
    raw = str(getattr(run, "state", "") or "RUNTIME_STATE_UNSPECIFIED")
    state = STATES.get(raw, "Running")
    run_id = str(run.run_id)
    if state != "Failed":
        message = "" if raw in ("RUNNING", "SUCCEEDED", "PENDING") else raw.lower()
        return RunObservation(state, run_id, message)
    error = getattr(run, "error", None)
    run_error = str(getattr(error, "message", "") or "")
    task = _failed_task(run)
    if raw == "CANCELED":
        return RunObservation("Failed", run_id, "the run was canceled in Kubeflow Pipelines")
    if raw == "SKIPPED":
        return RunObservation("Failed", run_id, "Kubeflow Pipelines skipped the run")
    if task is None:
        return RunObservation("Failed", run_id, run_error or "the run failed")
    display = str(getattr(task, "display_name", "") or "")
    task_error = str(getattr(getattr(task, "error", None), "message", "") or "")
    message = f"task {display!r} failed: {task_error or run_error or 'no error message'}"
    return RunObservation("Failed", run_id, message, failed_step=step_of_task(display))


class KfpExecutor:
    """Runs TrainingRun pipelines on Kubeflow Pipelines (see the module docstring)."""

    def __init__(
        self,
        host: str,
        *,
        multi_user: bool = False,
        existing_token: str | None = None,
        ssl_ca_cert: str | None = None,
        verify_ssl: bool | None = None,
        request_timeout: float = 30.0,
    ) -> None:
        self.host = host
        self.multi_user = multi_user
        self.request_timeout = request_timeout
        self._client_args: dict[str, Any] = {
            "host": host,
            "existing_token": existing_token,
            "ssl_ca_cert": ssl_ca_cert,
            "verify_ssl": verify_ssl,
        }
        self._client: Any = None
        self._experiments: dict[str, str] = {}
        self._deadlines: dict[str, tuple[float, float]] = {}  # run id → (deadline, timeout)

    # --- plumbing ------------------------------------------------------------------------

    def _kfp(self) -> Any:
        """The ``kfp.Client``, created on first use (its constructor calls the API)."""
        if self._client is None:
            import kfp

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                self._client = kfp.Client(**self._client_args)
        return self._client

    async def _call(self, what: str, fn: Callable[[], T]) -> T:
        def mapped() -> T:
            try:
                return fn()
            except ExecutorError:
                raise
            except Exception as exc:
                raise map_error(exc, self.host, what) from exc

        try:
            return await asyncio.wait_for(asyncio.to_thread(mapped), self.request_timeout)
        except TimeoutError:
            raise ExecutorError(
                f"{what}: Kubeflow Pipelines at {self.host} did not answer in "
                f"{self.request_timeout:g}s",
                temporary=True,
            ) from None

    def _namespace(self, namespace: str) -> str | None:
        return namespace if self.multi_user else None

    # --- the Executor protocol -----------------------------------------------------------

    async def submit(self, sub: Submission) -> str:
        experiment_id = await self._experiment(sub.namespace)
        display = run_display_name(sub.namespace, sub.name, sub.attempt)
        existing = await self._find_run(experiment_id, display)
        if existing is not None:
            run_id, created = existing
        else:
            run_id = await self._call(
                f"create run {display}", lambda: self._create_run(experiment_id, display, sub)
            )
            created = time.time()
        if sub.timeout_s > 0:
            self._deadlines[run_id] = (created + sub.timeout_s, sub.timeout_s)
        return run_id

    async def observe(self, namespace: str, name: str, attempt: int, run_id: str) -> RunObservation:
        from kfp_server_api.exceptions import ApiException

        client = await self._call("connect", self._kfp)

        def get() -> Any:
            try:
                return client.get_run(run_id)
            except ApiException as exc:
                if exc.status == 404:
                    return None
                raise

        run = await self._call(f"get run {run_id}", get)
        if run is None:
            return RunObservation("Unknown", run_id, f"Kubeflow Pipelines has no run {run_id}")
        seen = describe(run)
        deadline, timeout = self._deadlines.get(run_id, (0.0, 0.0))
        if seen.state in ("Pending", "Running") and deadline and time.time() > deadline:
            await self.cancel(namespace, name, attempt, run_id)
            return RunObservation(
                "Failed", run_id, f"timed out after {timeout:g}s (run terminated)"
            )
        if seen.state in ("Succeeded", "Failed"):
            self._deadlines.pop(run_id, None)
        return seen

    async def cancel(self, namespace: str, name: str, attempt: int, run_id: str) -> None:
        from kfp_server_api.exceptions import ApiException

        client = await self._call("connect", self._kfp)

        def terminate() -> None:
            try:
                client.terminate_run(run_id)
            except ApiException as exc:
                # Gone, or already finished: nothing left to stop.
                if exc.status not in (400, 404, 412):
                    raise

        await self._call(f"terminate run {run_id}", terminate)
        self._deadlines.pop(run_id, None)

    # --- steps of submit (worker threads) ----------------------------------------------------

    async def _experiment(self, namespace: str) -> str:
        if namespace in self._experiments:
            return self._experiments[namespace]
        name = experiment_name(namespace)

        def ensure() -> str:
            client = self._kfp()
            found = client.list_experiments(
                filter=_filter_by_name(name), namespace=self._namespace(namespace), page_size=10
            )
            experiments = list(found.experiments or [])
            if experiments:
                return str(experiments[0].experiment_id)
            created = client.create_experiment(
                name=name,
                description=f"kubeloop TrainingRuns of namespace {namespace}",
                namespace=self._namespace(namespace),
            )
            return str(created.experiment_id)

        self._experiments[namespace] = await self._call(f"experiment {name}", ensure)
        return self._experiments[namespace]

    async def _find_run(self, experiment_id: str, display: str) -> tuple[str, float] | None:
        """The run already submitted under ``display`` (its id and creation time), if any."""

        def find() -> tuple[str, float] | None:
            found = self._kfp().list_runs(
                experiment_id=experiment_id, filter=_filter_by_name(display), page_size=10
            )
            runs = [r for r in found.runs or [] if r.display_name == display]
            if not runs:
                return None
            oldest = min(runs, key=_created)
            return str(oldest.run_id), _created(oldest)

        return await self._call(f"look up run {display}", find)

    def _create_run(self, experiment_id: str, display: str, sub: Submission) -> str:
        with tempfile.TemporaryDirectory(prefix="kubeloop-kfp-") as tmp:
            package = Path(tmp) / "pipeline.yaml"
            package.write_text(sub.ir_yaml)
            run = self._kfp().run_pipeline(
                experiment_id=experiment_id,
                job_name=display,
                pipeline_package_path=str(package),
                params=dict(sub.arguments),
            )
        return str(run.run_id)


def _created(run: Any) -> float:
    """When KFP created the run (now if it does not say)."""
    created = getattr(run, "created_at", None)
    if isinstance(created, dt.datetime):
        return created.timestamp()
    return time.time()
