#!/usr/bin/env python3
"""Start and stop a local Prometheus (Debian's ``prometheus`` package) for tests and the demo.

    prometheus.py up      # idempotent: reuses a ready Prometheus in the same state directory
    prometheus.py down
    prometheus.py status

Prometheus listens on 127.0.0.1 only, keeps its TSDB in the state directory and scrapes one job,
``kubeloop-local``, whose targets are the ``*.json`` files in the targets directory
(``file_sd_configs``): the operator writes one file per local model server and Prometheus picks
changes up by itself. Like the control plane, it runs detached (its own session) with a pid file
and a log in the state directory. Standard library only: tests import this file directly.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from hack.cluster.cluster import stop_process_group

JOB = "kubeloop-local"
CACHE = Path(
    os.environ.get(
        "KUBELOOP_CACHE",
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kubeloop",
    )
)


class PrometheusNotInstalled(RuntimeError):
    """No ``prometheus`` binary on this machine."""


@dataclass(frozen=True)
class Prom:
    state_dir: Path
    port: int
    targets_dir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def find_binary() -> Path:
    """``prometheus`` on PATH, else Debian's /usr/bin/prometheus."""
    found = shutil.which("prometheus")
    if found:
        return Path(found)
    debian = Path("/usr/bin/prometheus")
    if debian.exists():
        return debian
    raise PrometheusNotInstalled(
        "no prometheus binary on PATH or at /usr/bin/prometheus: "
        "run `apt-get install prometheus` (Debian's package)"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    """Whether Prometheus could listen on ``port`` again: Go's listeners set SO_REUSEADDR, so a
    port whose last connections linger in TIME_WAIT is free to it, and the check does the same
    (without it, a restarted Prometheus almost always moved to another port)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _port(state_dir: Path, *, running: bool) -> int:
    """The port this state directory uses, kept across restarts while nobody else took it."""
    path = state_dir / "port"
    if path.exists():
        port = int(path.read_text())
        if running or _port_free(port):
            return port
    port = _free_port()
    path.write_text(str(port))
    return port


def _config(targets_dir: Path, scrape_interval: str) -> str:
    # JSON is YAML, so the standard library writes Prometheus' configuration.
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [
            {
                "job_name": JOB,
                # The servers' own labels (model, version, code...) win over the file_sd
                # labels; `namespace` comes from the file_sd labels, the runtime sets none.
                "honor_labels": True,
                "file_sd_configs": [
                    {"files": [str(targets_dir / "*.json")], "refresh_interval": "1s"}
                ],
            }
        ],
    }
    return json.dumps(config, indent=2) + "\n"


def _pid(state_dir: Path) -> int | None:
    """The pid of this state directory's Prometheus, if it is alive."""
    try:
        pid = int((state_dir / "prometheus.pid").read_text())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    return pid


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/-/ready", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:  # refused, reset, timeout; urllib's HTTPError (503 while starting) too
        return False


def _log_tail(state_dir: Path) -> str:
    log = state_dir / "prometheus.log"
    return log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"


def up(
    state_dir: Path, *, targets_dir: Path, scrape_interval: str = "1s", timeout: float = 60
) -> Prom:
    """Start (or reuse) Prometheus for ``state_dir``; return once ``/-/ready`` answers 200.

    A running Prometheus whose configuration changed (other targets directory or interval) is
    told to reload it (SIGHUP) rather than restarted.
    """
    binary = find_binary()
    state_dir = state_dir.resolve()
    targets_dir = targets_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    targets_dir.mkdir(parents=True, exist_ok=True)
    pid = _pid(state_dir)
    prom = Prom(state_dir, _port(state_dir, running=pid is not None), targets_dir)

    config_file = state_dir / "prometheus.yml"
    config = _config(targets_dir, scrape_interval)
    changed = not config_file.exists() or config_file.read_text() != config
    if changed:
        tmp = config_file.with_suffix(".tmp")
        tmp.write_text(config)
        os.replace(tmp, config_file)

    if pid is not None:
        if changed:
            os.kill(pid, signal.SIGHUP)
    else:
        log = open(state_dir / "prometheus.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            [
                str(binary),
                f"--config.file={config_file}",
                f"--web.listen-address=127.0.0.1:{prom.port}",
                f"--storage.tsdb.path={state_dir / 'data'}",
                "--storage.tsdb.retention.time=1d",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        (state_dir / "prometheus.pid").write_text(str(proc.pid))

    deadline = time.monotonic() + timeout
    while not ready(prom.url):
        if _pid(state_dir) is None:
            raise RuntimeError(f"prometheus exited during start-up\n{_log_tail(state_dir)}")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"prometheus not ready at {prom.url} after {timeout:.0f}s\n{_log_tail(state_dir)}"
            )
        time.sleep(0.1)
    return prom


def down(state_dir: Path) -> None:
    """Stop this state directory's Prometheus (SIGTERM, then SIGKILL after 10 s); keep its data."""
    pid_file = state_dir / "prometheus.pid"
    pid = _pid(state_dir)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        return
    stop_process_group(pid, grace_s=10)
    pid_file.unlink(missing_ok=True)


def default_state_dir() -> Path:
    return Path(os.environ.get("KUBELOOP_PROMETHEUS_DIR", CACHE / "prometheus"))


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--state-dir", type=Path, default=default_state_dir())
    parser.add_argument(
        "--targets-dir",
        type=Path,
        default=None,
        help="file_sd directory (default: <state-dir>/targets)",
    )
    parser.add_argument("--scrape-interval", default="1s")
    args = parser.parse_args()
    if args.command == "up":
        try:
            prom = up(
                args.state_dir,
                targets_dir=args.targets_dir or args.state_dir / "targets",
                scrape_interval=args.scrape_interval,
            )
        except PrometheusNotInstalled as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"prometheus ready at {prom.url}; scrape targets in {prom.targets_dir}")
        print(f"export KUBELOOP_PROMETHEUS_URL={prom.url}")
        print(f"export KUBELOOP_SCRAPE_TARGETS_DIR={prom.targets_dir}")
    elif args.command == "down":
        down(args.state_dir)
        print("prometheus stopped")
    else:
        port_file = args.state_dir / "port"
        url = f"http://127.0.0.1:{port_file.read_text().strip()}" if port_file.exists() else ""
        ok = bool(url) and _pid(args.state_dir) is not None and ready(url)
        print(f"ready at {url}" if ok else "down")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
