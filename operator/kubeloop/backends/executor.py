"""The TrainingRun executors' common interface: run a compiled pipeline, report on it.

An executor runs one attempt of a TrainingRun: the KFP IR the compiler produced
(``kubeloop_pipelines.compiler``), with the attempt's run directory as argument. Two exist:
``local`` (``executor_local``: ``kfp.local`` in a detached process per run, the embedded default)
and ``kfp`` (``executor_kfp``: a Kubeflow Pipelines API). Both are keyed by
``(namespace, name, attempt)`` and idempotent, so a restarted operator re-attaches to the run
it started instead of starting a second one.

Errors: ``ExecutorError(message, temporary=)``; temporary ones (the API is down, a 5xx) heal
by retrying later, the others (the API refused the pipeline) will not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

RunState = Literal["Pending", "Running", "Succeeded", "Failed", "Unknown"]


class ExecutorError(Exception):
    """The executor could not do what was asked; ``temporary`` says whether to retry."""

    def __init__(self, message: str, temporary: bool) -> None:
        super().__init__(message)
        self.temporary = temporary

    @property
    def message(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Submission:
    """One attempt of a TrainingRun, compiled and ready to run."""

    namespace: str
    name: str
    attempt: int
    ir_yaml: str  # KFP IR (PipelineSpec + PlatformSpec YAML documents)
    spec_hash: str  # sha256 of ir_yaml
    run_uri: str  # the attempt's run directory (file://, s3://, gs://)
    arguments: dict[str, str] = field(default_factory=dict)  # pipeline parameters
    timeout_s: float = 0.0  # deadline of the whole run; 0 means none


@dataclass(frozen=True)
class RunObservation:
    """What the executor sees of a run. ``Unknown``: no such run (e.g. its state was lost)."""

    state: RunState
    run_id: str
    message: str = ""
    failed_step: str = ""  # the pipeline step that failed (ingest, train, ...), if known
    log_tail: str = ""  # the last lines of the run's log, where the executor has them


class Executor(Protocol):
    async def submit(self, sub: Submission) -> str:
        """Start the run and return its id; the same (namespace, name, attempt) returns the
        existing run's id and never starts a second run."""
        ...

    async def observe(self, namespace: str, name: str, attempt: int, run_id: str) -> RunObservation:
        """The run's state now (``Unknown`` when the executor has no such run)."""
        ...

    async def cancel(self, namespace: str, name: str, attempt: int, run_id: str) -> None:
        """Stop the run if it still runs (a no-op for a finished or unknown run)."""
        ...


def run_display_name(namespace: str, name: str, attempt: int) -> str:
    """The name a run is known by in an executor: ``<namespace>.<name>.attempt-<n>``."""
    return f"{namespace}.{name}.attempt-{attempt}"
