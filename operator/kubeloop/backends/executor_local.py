"""The local executor: each run is ``python -m kubeloop_pipelines.local_runner`` (kfp.local).

Every attempt gets a directory ``<state_dir>/training/<namespace>/<name>/attempt-<n>/``:

- ``run.json``: who the run is (run id, spec hash, run URI, timeout, when it was submitted);
- ``pipeline.yaml`` and ``arguments.json``: what the runner executes (the submitted IR as is);
- ``pid``, ``run.log``, ``outputs/``: the runner process, its log, kfp.local's artifacts;
- ``result.json``: how it ended (written once, by the runner, or here on timeout, cancel or a
  runner that died without one).

The runner starts detached (its own session and process group), so the operator's event loop
never waits on it and a restarted operator finds it: ``submit`` for an attempt that has a live
runner or a result returns the existing run id; it never starts a second process. Cancelling
or timing out kills the runner's process group (the runner and the tasks it started).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubeloop.backends.executor import ExecutorError, RunObservation, RunState, Submission
from kubeloop_pipelines.progress import read_json_object, read_steps

RUNNER_MODULE = "kubeloop_pipelines.local_runner"
RUN_FILE = "run.json"
PIPELINE_FILE = "pipeline.yaml"
ARGUMENTS_FILE = "arguments.json"
PID_FILE = "pid"
LOG_FILE = "run.log"
RESULT_FILE = "result.json"
LOG_TAIL_LINES = 40
STOP_GRACE_S = 5.0
EXEC_WAIT_S = 5.0


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _runner_alive(pid: int, run_dir: Path) -> bool:
    """The pid is a live runner of this run directory (pids are reused; zombies have no
    command line)."""
    cmdline = _cmdline(pid)
    return RUNNER_MODULE in cmdline and str(run_dir) in cmdline


def _runner_pids(marker: Path) -> list[int]:
    """Live local runners whose command line names ``marker`` (a run or state directory)."""
    pids = []
    for entry in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError, ValueError):
            text = entry.read_bytes().replace(b"\0", b" ").decode()
            if RUNNER_MODULE in text and str(marker) in text:
                pids.append(int(entry.parent.name))
    return pids


def _kill_group(pid: int, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM the process group led by ``pid``, SIGKILL what is left after ``grace``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 2.0)
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            if not _cmdline(pid) and not _group_alive(pid):
                return
            time.sleep(0.05)


def _read_pid(folder: Path) -> int:
    try:
        return int((folder / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return 0


def _group_members(pgid: int, marker: Path) -> list[int]:
    """Live processes of group ``pgid`` whose command line names ``marker`` (pids are reused:
    a task of ours names its run directory in its arguments)."""
    members = []
    for entry in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = entry.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                pid = int(entry.parent.name)
                if str(marker) in _cmdline(pid):
                    members.append(pid)
    return members


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Only zombies left counts as gone: check that some member still has a command line.
    for entry in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = entry.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    from kubeloop_pipelines.local_runner import log_tail as runner_log_tail

    return runner_log_tail(path, lines)


class LocalExecutor:
    """Runs TrainingRun pipelines with kfp.local in detached processes (see module docstring)."""

    def __init__(self, state_dir: Path, python: str = sys.executable) -> None:
        self.root = Path(state_dir) / "training"
        self.python = python
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    def run_dir(self, namespace: str, name: str, attempt: int) -> Path:
        return self.root / namespace / name / f"attempt-{attempt}"

    # --- the Executor protocol -----------------------------------------------------------

    async def submit(self, sub: Submission) -> str:
        return await asyncio.to_thread(self._submit, sub)

    async def observe(self, namespace: str, name: str, attempt: int, run_id: str) -> RunObservation:
        return await asyncio.to_thread(self._observe, namespace, name, attempt, run_id)

    async def cancel(self, namespace: str, name: str, attempt: int, run_id: str) -> None:
        await asyncio.to_thread(self._cancel, namespace, name, attempt, run_id)

    # --- implementation (worker threads) ---------------------------------------------------

    def _submit(self, sub: Submission) -> str:
        folder = self.run_dir(sub.namespace, sub.name, sub.attempt)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ExecutorError(f"cannot create {folder}: {exc}", temporary=True) from exc
        known = read_json_object(folder / RUN_FILE)
        if known is not None and known.get("specHash") != sub.spec_hash:
            self._set_aside(folder, known, sub)
            known = None
        if known is not None:
            run_id = str(known["runId"])
            # Started before (or by an operator that restarted): re-attach, never run twice.
            if (folder / RESULT_FILE).exists() or self._live_pid(folder) is not None:
                return run_id
            if (folder / PID_FILE).exists():
                return run_id  # it ran and died without a result: observe reports that
        else:
            run_id = f"local-{uuid.uuid4().hex[:16]}"
        try:
            (folder / PIPELINE_FILE).write_text(sub.ir_yaml)
            _write_json(folder / ARGUMENTS_FILE, dict(sub.arguments))
            _write_json(
                folder / RUN_FILE,
                {
                    "runId": run_id,
                    "namespace": sub.namespace,
                    "name": sub.name,
                    "attempt": sub.attempt,
                    "specHash": sub.spec_hash,
                    "runUri": sub.run_uri,
                    "timeoutS": sub.timeout_s,
                    "submittedAt": _now(),
                    "startedAt": time.time(),
                },
            )
            self._spawn(folder, sub.timeout_s)
        except OSError as exc:
            raise ExecutorError(
                f"cannot start the local runner in {folder}: {exc}", temporary=True
            ) from exc
        return run_id

    def _set_aside(self, folder: Path, known: dict[str, Any], sub: Submission) -> None:
        """The attempt's directory holds another pipeline (e.g. a TrainingRun deleted and
        created again under the same name): keep it aside if it ended, refuse if it runs."""
        if self._live_pid(folder) is not None:
            raise ExecutorError(
                f"attempt {sub.attempt} of {sub.namespace}/{sub.name} is running pipeline "
                f"{str(known.get('specHash'))[:12]}, not {sub.spec_hash[:12]}: cancel it or "
                "submit a new attempt",
                temporary=False,
            )
        aside = folder.with_name(f"{folder.name}.replaced-{int(time.time())}")
        try:
            folder.rename(aside)
            folder.mkdir(parents=True)
        except OSError as exc:
            raise ExecutorError(f"cannot move {folder} aside: {exc}", temporary=True) from exc

    def _spawn(self, folder: Path, timeout_s: float) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        args = [self.python, "-m", RUNNER_MODULE, "--state-dir", str(folder)]
        if timeout_s > 0:
            args += ["--timeout", f"{timeout_s:g}"]
        with (folder / LOG_FILE).open("ab") as log:
            proc = subprocess.Popen(
                args,
                cwd=folder,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._children[proc.pid] = proc
        # Until it has exec'd, the child's command line is ours: wait for it (milliseconds) so
        # that whoever reads the pid file next can recognise the runner.
        deadline = time.monotonic() + EXEC_WAIT_S
        while not _runner_alive(proc.pid, folder) and time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            time.sleep(0.002)
        (folder / PID_FILE).write_text(f"{proc.pid}\n")

    def _live_pid(self, folder: Path) -> int | None:
        self._reap()
        pid = _read_pid(folder)
        child = self._children.get(pid)
        if child is not None and child.poll() is None:
            return pid  # ours and running (maybe not yet exec'd: its cmdline is still ours)
        if pid and _runner_alive(pid, folder):
            return pid
        # Between spawning and writing the pid file (or with the file lost): look it up.
        found = [p for p in _runner_pids(folder) if _runner_alive(p, folder)]
        return found[0] if found else None

    def _reap(self) -> None:
        for pid, proc in list(self._children.items()):
            if proc.poll() is not None:
                del self._children[pid]

    def _observe(self, namespace: str, name: str, attempt: int, run_id: str) -> RunObservation:
        folder = self.run_dir(namespace, name, attempt)
        known = read_json_object(folder / RUN_FILE)
        if known is None or (run_id and known.get("runId") != run_id):
            return RunObservation("Unknown", run_id, f"no local run {run_id} in {folder}")
        result = read_json_object(folder / RESULT_FILE)
        if result is not None:
            return self._ended(run_id, result)
        pid = self._live_pid(folder)
        if pid is not None:
            timeout = float(known.get("timeoutS") or 0)
            started = float(known.get("startedAt") or time.time())
            if timeout > 0 and time.time() - started > timeout:
                self._stop(folder, pid, f"timed out after {timeout:g}s")
                return self._ended(run_id, read_json_object(folder / RESULT_FILE) or {})
            return RunObservation("Running", run_id)
        # No runner: it may have written its result just now; else it died without one.
        result = read_json_object(folder / RESULT_FILE)
        if result is None:
            self._record(folder, "runner exited without a result")
            result = read_json_object(folder / RESULT_FILE) or {}
            # The task it was running may live on, orphaned, in the runner's process group.
            pgid = _read_pid(folder)
            if pgid and _group_members(pgid, folder):
                _kill_group(pgid, grace=1.0)
        return self._ended(run_id, result)

    @staticmethod
    def _ended(run_id: str, result: dict[str, Any]) -> RunObservation:
        state: RunState = "Succeeded" if result.get("state") == "Succeeded" else "Failed"
        return RunObservation(
            state,
            run_id,
            message=str(result.get("message", "")),
            failed_step=str(result.get("failedStep", "")),
            log_tail=str(result.get("logTail", "")),
        )

    def _record(self, folder: Path, message: str) -> None:
        """Write a Failed result (unless the runner wrote one first)."""
        from kubeloop_pipelines.local_runner import write_result_once

        write_result_once(
            folder,
            {
                "state": "Failed",
                "finishedAt": _now(),
                "message": message,
                "failedStep": _running_step(folder),
                "logTail": log_tail(folder / LOG_FILE),
            },
        )

    def _stop(self, folder: Path, pid: int, message: str) -> None:
        # The result first: the runner, killed, must not be taken for one that crashed.
        self._record(folder, message)
        _kill_group(pid)
        self._reap()

    def _cancel(self, namespace: str, name: str, attempt: int, run_id: str) -> None:
        folder = self.run_dir(namespace, name, attempt)
        known = read_json_object(folder / RUN_FILE)
        if known is None or (run_id and known.get("runId") != run_id):
            return
        pid = self._live_pid(folder)
        if pid is not None:
            self._stop(folder, pid, "canceled")

    def stop_all(self) -> None:
        """Stop every runner under this state directory (tests and the demo; not the operator,
        whose restart must find its runs still running)."""
        for pid in _runner_pids(self.root):
            _kill_group(pid, grace=1.0)
        self._reap()


def _running_step(folder: Path) -> str:
    """The step that was running when the run was stopped, from its progress records."""
    known = read_json_object(folder / RUN_FILE) or {}
    uri = str(known.get("runUri", ""))
    if not uri.startswith("file://"):
        return ""
    records = read_steps(Path(uri.removeprefix("file://")))
    running = [
        (str(r.get("startedAt", "")), s)
        for s, r in records.items()
        if r.get("state") in ("Running", "Failed")
    ]
    return max(running)[1] if running else ""
