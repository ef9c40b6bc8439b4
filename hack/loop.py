"""The closed loop, driven against a running operator: the world's manifests, labelled traffic,
and the stage clock. `make demo` (hack/demo.py) tells it, bench/closed_loop.py times it,
tests/integration/test_drift_loop.py asserts it.

The story (hack/demo_data.py is the world): a TrainingRun trains ``payments`` on ``before``
payments and registers it under the alias ``candidate``; a ModelDeployment follows that alias
and serves it with a request log and label feedback; clients send payments and feed back
whether each was fraud. Then the world shifts (three features move and the fraud pattern
changes); the DriftPolicy sees the served features leave the reference and the labelled
accuracy fall, retrains on the labelled rows served since the breach began, and the new version
(claiming ``candidate``) is canaried and promoted. The policy re-baselines on it.

Intervals are seconds, not minutes, so the loop runs in a few minutes; the logic is the same.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from hack import demo_data

MODEL: Final = "payments"  # the registered model, the deployment and the first TrainingRun
POLICY: Final = "payments-drift"
ALIAS: Final = "candidate"
TRAIN_ROWS: Final = 4000
API: Final = "kubeloop.dev/v1alpha1"
AUTO: Final = {"threshold": "auto", "falseAlarmRate": 0.001}


def manifests(
    data_uri: str,
    *,
    interval: str = "4s",
    window: str = "30s",
    hold: str = "8s",
    cooldown: str = "10m",
    approval: str = "none",
    dry_run: bool = False,
) -> dict[str, dict[str, Any]]:
    """The three resources a team applies: the TrainingRun, the ModelDeployment that follows
    the alias it registers, and the DriftPolicy on that deployment."""
    training = {
        "apiVersion": API,
        "kind": "TrainingRun",
        "metadata": {"name": MODEL},
        "spec": demo_data.training_spec(data_uri, MODEL, alias=ALIAS),
    }
    deployment = {
        "apiVersion": API,
        "kind": "ModelDeployment",
        "metadata": {"name": MODEL},
        "spec": {
            "model": {"alias": {"modelName": MODEL, "alias": ALIAS}},
            "serving": {
                "backend": "local",
                "monitoring": {
                    # a file every 2 s: the retrain reads the rows up to the breach
                    "requestLog": {"enabled": True, "sampleRate": 1.0, "flushInterval": "2s"},
                    "feedbackTtl": "10m",
                },
            },
            "rollout": {
                "steps": [25, 50, 100],
                "interval": "5s",
                "maxDuration": "10m",
                "analysis": {
                    "minRequests": 20,
                    "maxErrorRate": 0.05,
                    "maxP99LatencyMs": 3000,
                    # The retrained model is meant to answer differently from the stable one:
                    # the prediction-shift check would refuse the very change the loop wants;
                    # labelled accuracy judges it instead.
                    "maxPredictionShift": 10.0,  # its largest value
                    "maxAccuracyDrop": 0.05,
                    "minLabelledRows": 50,
                    "failureLimit": 1,
                },
            },
        },
    }
    policy = {
        "apiVersion": API,
        "kind": "DriftPolicy",
        "metadata": {"name": POLICY},
        "spec": {
            "target": {"name": MODEL},
            "interval": interval,
            "window": window,
            "for": hold,
            # auto thresholds at 0.1 % false alarms: evaluations every few seconds over
            # overlapping windows must not cry wolf; the shift lands 10 to 80 times over them.
            "signals": [
                {"name": "features", "type": "psi", "feature": "*", **AUTO},
                {"name": "prediction", "type": "prediction", **AUTO},
                {"name": "accuracy", "type": "accuracy", "minCount": 200, **AUTO},
            ],
            "action": {
                "mode": "retrain",
                "data": "served",
                "cooldown": cooldown,
                "maxRetrainsPerDay": 2,
                "approval": approval,
                "dryRun": dry_run,
            },
        },
    }
    return {"training": training, "deployment": deployment, "policy": policy}


def write_training_data(artifact_root: Path, namespace: str, seed: int = 1) -> str:
    """The ``before`` table under the tenant's prefix; returns its file:// URI."""
    path = artifact_root / namespace / "data" / "payments-before.csv"
    demo_data.write_training_csv(path, TRAIN_ROWS, seed)
    return f"file://{path}"


class Traffic(threading.Thread):
    """Payments sent to the deployment in batches of ``batch`` rows, each answer's rows
    labelled right after (``POST .../feedback`` by request id). ``regime`` may change while
    it runs: that is the shift. Bounded: stops after ``max_batches`` or when ``stopped``."""

    def __init__(
        self,
        url: str,
        *,
        seed: int = 11,
        batch: int = 8,
        pause_s: float = 0.03,
        label: bool = True,
        max_batches: int = 200_000,
    ) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.feedback_url = url.rsplit("/infer", 1)[0] + "/feedback"
        self.regime: demo_data.Regime = "before"
        self.label, self.pause_s, self.max_batches = label, pause_s, max_batches
        self.stopped = threading.Event()
        self.codes: Counter[int] = Counter()
        self.feedback: Counter[str] = Counter()
        self.rows = 0
        self._streams = {
            "before": demo_data.traffic("before", seed=seed, batch_size=batch),
            "after": demo_data.traffic("after", seed=seed + 1, batch_size=batch),
        }

    def run(self) -> None:
        for _ in range(self.max_batches):
            if self.stopped.is_set():
                return
            rows, labels = next(self._streams[self.regime])
            rid = uuid.uuid4().hex
            body = {
                "id": rid,
                "inputs": [
                    {
                        "name": "input-0",
                        "shape": [len(rows), len(rows[0])],
                        "datatype": "FP32",
                        "data": [v for row in rows for v in row],
                    }
                ],
            }
            code = _post(self.url, body, rid)
            self.codes[code] += 1
            if code == 200:
                self.rows += len(rows)
                if self.label:
                    items = [{"id": rid, "row": i, "label": y} for i, y in enumerate(labels)]
                    self.feedback[str(_post(self.feedback_url, items, rid))] += 1
            time.sleep(self.pause_s)


def _post(url: str, payload: Any, rid: str) -> int:
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "X-Request-Id": rid},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


@dataclass
class Kubectl:
    """kubectl against one namespace (the demo, the bench and the test share it)."""

    binary: Path
    kubeconfig: Path
    namespace: str

    def run(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        result = subprocess.run(
            [str(self.binary), f"--kubeconfig={self.kubeconfig}", "-n", self.namespace, *args],
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if check and result.returncode:
            raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def apply(self, doc: dict[str, Any]) -> None:
        self.run("apply", "-f", "-", stdin=json.dumps(doc))

    def refusal(self, doc: dict[str, Any]) -> str:
        """What the API server answers when it refuses ``doc`` ('' if it took it)."""
        try:
            self.apply(doc)
        except RuntimeError as exc:
            return str(exc).split('STDIN": ', 1)[-1]  # after kubectl's "error when creating"
        return ""

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        out = self.run("get", kind, name, "-o", "json", check=False)
        return json.loads(out) if out.strip() else None

    def status(self, kind: str, name: str) -> dict[str, Any]:
        obj = self.get(kind, name) or {}
        return dict(obj.get("status") or {})

    def items(self, kind: str, selector: str = "") -> list[dict[str, Any]]:
        args = ["get", kind, "-o", "json", *(["-l", selector] if selector else [])]
        return list(json.loads(self.run(*args)).get("items") or [])


def wait(
    check: Callable[[], Any],
    *,
    within: float,
    what: str,
    every: float = 0.5,
) -> Any:
    """Poll ``check`` until it returns something truthy."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what} not reached within {within:.0f}s")


@dataclass
class Clock:
    """When each stage of the loop was seen (``time.monotonic()``)."""

    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, stage: str) -> None:
        self.marks.setdefault(stage, time.monotonic())

    def between(self, start: str, end: str) -> float:
        return self.marks[end] - self.marks[start]


def serving(k: Kubectl, version: str | None = None) -> dict[str, Any] | None:
    """The deployment's status once it serves (``version`` as its stable one)."""
    st = k.status("md", MODEL)
    stable = st.get("stable", {}).get("modelVersion")
    ok = st.get("phase") in ("Serving", "Promoted") and st.get("url") and stable
    return st if ok and (version is None or stable == version) else None


def retrains(k: Kubectl) -> list[dict[str, Any]]:
    return list(k.status("dp", POLICY).get("retrains") or [])


def retrain_runs(k: Kubectl) -> list[dict[str, Any]]:
    return k.items("tr", f"kubeloop.dev/drift-policy={POLICY}")
