"""Run a compiled pipeline (KFP IR YAML) with ``kfp.local``, as its own process.

    python -m kubeloop_pipelines.local_runner --state-dir DIR [--timeout SECONDS]

``DIR`` holds ``pipeline.yaml`` (the IR, exactly as submitted) and ``arguments.json`` (the
pipeline arguments, e.g. ``{"run_uri": ...}``). The runner writes

- ``pid`` at start; its stdout and stderr (kfp.local's log and every task's output) go to
  ``run.log``;
- ``outputs/`` (kfp.local's pipeline root: the task artifacts);
- ``result.json`` at the end: ``{state: Succeeded|Failed, startedAt, finishedAt, message,
  failedStep, logTail}`` — written once (the first writer wins, so a timeout or a cancel
  recorded by the executor is not overwritten).

It runs the *loaded IR*: ``kfp.components.load_component_from_file`` turns the YAML into a
graph component whose ``PipelineSpec`` is the parsed file, and calling it under
``kfp.local.init(SubprocessRunner(use_venv=False))`` hands that spec to kfp.local's DAG
orchestrator. No Python pipeline function is rebuilt, so the local executor runs the same
bytes a Kubeflow cluster would get.

Retries: kfp.local (2.17) honours each task's ``retryPolicy`` (``set_retry``: count, backoff,
factor), like a cluster. A step that failed *permanently* (its progress record in
``<run_uri>/steps/`` says ``permanent``) is not worth the backoff: a watcher ends the run as
soon as such a record appears (and the retried component would fail at once anyway, see
``step_runner.run_step``).

Caching: kfp.local's own task cache (``local.init(enable_caching=...)``, off by default) stays
off: it keys a task by its input artifacts' URIs and leaves the cached outputs in the first
run's folder, and a hit skips the component, so the attempt's run directory would get no
progress record. The cached steps look in the run store's step cache themselves
(``step_cache``, ``step_runner.run_step``); they get the run URI from ``KUBELOOP_RUN_URI``, set
here for every task this process starts, since a run URI input would change their inputs every
attempt.

``kfp.local.init`` is process-global and the run blocks, hence one process per run; the
operator starts it detached (``executor_local.LocalExecutor``) and re-attaches after a restart.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubeloop_pipelines.progress import read_json_object, read_steps
from kubeloop_pipelines.step_runner import RUN_URI_ENV

PIPELINE_FILE = "pipeline.yaml"
ARGUMENTS_FILE = "arguments.json"
PID_FILE = "pid"
LOG_FILE = "run.log"
RESULT_FILE = "result.json"
OUTPUTS_DIR = "outputs"
LOG_TAIL_LINES = 40
WATCH_INTERVAL = 0.5
MESSAGE_LIMIT = 4000

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_INNER_TASK = re.compile(r"Inner task failed: '([^']+)'")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` non-empty lines of a log, without colour codes."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 256 * 1024))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    kept = [line.rstrip() for line in strip_ansi(text).splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def write_result_once(state_dir: Path, result: dict[str, Any]) -> bool:
    """Write ``result.json`` unless one exists (atomically: link a complete temp file)."""
    target = state_dir / RESULT_FILE
    tmp = state_dir / f".{RESULT_FILE}.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    try:
        os.link(tmp, target)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def step_records(run_uri: str) -> dict[str, dict[str, Any]]:
    """The progress records of a file:// run directory (none for object stores)."""
    if not run_uri.startswith("file://"):
        return {}
    return read_steps(Path(run_uri.removeprefix("file://")))


def failed_record(run_uri: str) -> tuple[str, dict[str, Any]] | None:
    """The most recently failed step and its record, if any step failed."""
    failed = [
        (str(r.get("finishedAt", "")), step, r)
        for step, r in step_records(run_uri).items()
        if r.get("state") == "Failed"
    ]
    if not failed:
        return None
    _, step, record = max(failed, key=lambda item: item[0])
    return step, record


def describe_failure(run_uri: str, error: str) -> tuple[str, str]:
    """(failed step, message) from the step records, else from kfp.local's error."""
    found = failed_record(run_uri)
    if found is not None:
        step, record = found
        message = str(record.get("message") or "failed")
        field = str(record.get("field") or "")
        where = f" ({field})" if field else ""
        return step, f"step {step} failed{where}: {message}"[:MESSAGE_LIMIT]
    clean = strip_ansi(error).strip()
    match = _INNER_TASK.search(clean)
    return (match.group(1) if match else ""), (clean or "pipeline failed")[:MESSAGE_LIMIT]


class Run:
    """One pipeline run in this process."""

    def __init__(self, state_dir: Path, timeout: float) -> None:
        self.state_dir = state_dir
        self.timeout = timeout
        self.started_at = now()
        self.arguments: dict[str, Any] = read_json_object(state_dir / ARGUMENTS_FILE) or {}
        self.run_uri = str(self.arguments.get("run_uri", ""))
        self.done = threading.Event()

    def finish(self, state: str, message: str = "", failed_step: str = "") -> bool:
        with contextlib.suppress(ValueError, OSError):
            sys.stdout.flush()
            sys.stderr.flush()
        return write_result_once(
            self.state_dir,
            {
                "state": state,
                "startedAt": self.started_at,
                "finishedAt": now(),
                "message": message,
                "failedStep": failed_step,
                "logTail": log_tail(self.state_dir / LOG_FILE),
            },
        )

    def end_now(self, state: str, message: str, failed_step: str = "") -> None:
        """Record the result and stop everything this run started (its process group)."""
        print(f"[kubeloop] {message}", flush=True)
        self.finish(state, message, failed_step)
        if os.getpgid(0) == os.getpid():  # our own group (started detached): take it all down
            os.killpg(os.getpid(), signal.SIGKILL)
        os._exit(1)

    def watch(self) -> None:
        """End the run at once when a step failed permanently or the deadline passed."""
        deadline = time.monotonic() + self.timeout if self.timeout > 0 else None
        while not self.done.wait(WATCH_INTERVAL):
            if deadline is not None and time.monotonic() > deadline:
                self.end_now("Failed", f"timed out after {self.timeout:g}s")
            found = failed_record(self.run_uri)
            if found is not None and found[1].get("permanent"):
                step, _ = found
                # Let the failing task finish writing its output, then skip the retries.
                time.sleep(1.0)
                if self.done.is_set():
                    return
                _, message = describe_failure(self.run_uri, "")
                self.end_now("Failed", f"{message} (permanent: not retried)", step)

    def execute(self) -> int:
        from kfp import components, local

        local.init(
            runner=local.SubprocessRunner(use_venv=False),
            pipeline_root=str(self.state_dir / OUTPUTS_DIR),
            workspace_root=str(self.state_dir / "workspace"),
            raise_on_error=True,
        )
        pipeline = components.load_component_from_file(str(self.state_dir / PIPELINE_FILE))
        if pipeline.component_spec.implementation.graph is None:
            # kfp takes a YAML whose pipeline is named like one of its components for that
            # single component (the compiler's names never collide: kubeloop-<model> vs steps).
            raise ValueError(
                f"{PIPELINE_FILE}: the pipeline is named like one of its components "
                f"({pipeline.name!r}); kfp.local would run only that component"
            )
        threading.Thread(target=self.watch, name="watch", daemon=True).start()
        os.environ[RUN_URI_ENV] = self.run_uri  # inherited by every task (see the docstring)
        try:
            pipeline(**self.arguments)
        except BaseException as exc:
            self.done.set()
            traceback.print_exc()
            step, message = describe_failure(self.run_uri, f"{type(exc).__name__}: {exc}")
            self.finish("Failed", message, step)
            return 1
        self.done.set()
        self.finish("Succeeded", "pipeline succeeded")
        return 0


def _redirect_output(log_path: Path) -> None:
    """Send this process's stdout/stderr (and its children's) to the run log."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--state-dir", required=True, type=Path, help="the run's directory")
    parser.add_argument("--timeout", type=float, default=0, help="seconds; 0: no deadline")
    args = parser.parse_args(argv)
    state_dir: Path = args.state_dir.resolve()
    (state_dir / PID_FILE).write_text(f"{os.getpid()}\n")
    _redirect_output(state_dir / LOG_FILE)
    # kfp.local logs its retries ("Task x failed (attempt 1/3). Retrying in 10.0s") at INFO
    # outside its own logging context: keep them in the run log.
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format="%(asctime)s - %(levelname)s - %(message)s"
    )
    run = Run(state_dir, args.timeout)
    print(f"[kubeloop] local run of {state_dir / PIPELINE_FILE} started {run.started_at}")
    try:
        return run.execute()
    except BaseException as exc:  # the run could not even start (e.g. unreadable IR)
        traceback.print_exc()
        run.finish("Failed", f"local runner failed: {type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
