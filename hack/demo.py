"""`make demo`: the closed loop on the embedded local control plane (no cluster needed).

1. A TrainingRun trains the ``payments`` fraud model on ``before`` payments (hack/demo_data.py)
   and registers it under the alias ``candidate``.
2. A ModelDeployment follows that alias and serves it (local model servers, a request log,
   label feedback); clients send payments and feed back which were fraud.
3. A DriftPolicy watches: on the steady stream it never fires.
4. The world shifts (three features move, the fraud pattern changes). The policy sees the served
   features leave the training reference and the labelled accuracy fall, holds the breach for
   ``for``, and retrains on the labelled rows served since the breach began.
5. The new version claims ``candidate``; the deployment canaries it under the same traffic and
   promotes it; the policy re-baselines on it.

The environment is installed the way a platform team installs kubeloop (hack/demo_install.py):
the Helm chart, through hack/helm.py (pyhelm3), as release ``kubeloop`` in ``kubeloop-system``
with the demo namespace as its tenant. The operator then runs as a local process (there is no
container runtime) from the chart's own settings, the Deployment's KUBELOOP_* environment, as
the chart's ServiceAccount; the demo prints each setting it has to change here, and why.

Ends with a summary: the drift scores per feature, the old and new model on post-shift held-out
payments, the rollout history and the time of each stage. The resources stay in the namespace
``kubeloop-demo`` for ``kubectl get kubeloop``.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from hack import demo_data, demo_install, loop  # noqa: E402
from hack import prometheus as prometheus_mod  # noqa: E402
from hack.cluster import cluster as cluster_mod  # noqa: E402
from hack.demo_install import ARTIFACTS, NAMESPACE, RELEASE, SYSTEM  # noqa: E402
from kubeloop.backends.serving_local import LocalServingBackend  # noqa: E402
from kubeloop.contract.labels import RETRAIN_REASON_ANNOTATION  # noqa: E402

RETRAIN_MARGIN = 0.10  # the retrained model must beat the old one by this much accuracy
PIPELINE_STEPS = ("ingest", "preprocess", "train", "evaluate", "register")  # those the spec runs


@dataclass
class Env:
    """What the story runs against."""

    cluster: cluster_mod.Cluster
    k: loop.Kubectl
    prom: prometheus_mod.Prom
    operator: subprocess.Popen[bytes]


def fresh_namespace(k: loop.Kubectl) -> None:
    """Start from an empty namespace so the demo tells the same story every run. Deleted
    only: the chart makes it again (it is the release's tenant), with its Role and peering."""
    names = k.run("get", "dp,md,tr,mv", "-o", "name", check=False).split()
    for name in names:  # an earlier run that was interrupted may have left finalizers
        k.run("patch", name, "--type=merge", "-p", '{"metadata":{"finalizers":null}}', check=False)
    k.run("delete", "namespace", NAMESPACE, "--ignore-not-found", "--timeout=120s", check=False)


@contextmanager
def environment(console: Console) -> Iterator[Env]:
    """The local control plane, Prometheus, kubeloop installed by its chart (CRDs, RBAC, the
    tenant namespace), and the operator running from the chart's settings."""
    console.rule("local control plane")
    cluster = cluster_mod.up(cluster_mod.default_state_dir())
    k = loop.Kubectl(cluster.bin_dir / "kubectl", cluster.kubeconfig, NAMESPACE)
    prom_state = cluster.state_dir / "prometheus"
    LocalServingBackend(cluster.state_dir / "operator-state", prom_state / "targets").stop_all()
    demo_install.unregister_webhook(k)  # one a killed demo left would refuse the clean-up below
    fresh_namespace(k)
    prom = prometheus_mod.up(prom_state, targets_dir=prom_state / "targets", scrape_interval="1s")
    console.print(f"API server {cluster.server}, Prometheus {prom.url}, namespace {NAMESPACE}")
    try:
        with demo_install.installed_operator(console, cluster, k, prom) as operator:
            yield Env(cluster, k, prom, operator)
    finally:
        # The model servers outlive the operator by design; the demo must not leave them.
        LocalServingBackend(cluster.state_dir / "operator-state", prom.targets_dir).stop_all()
        prometheus_mod.down(prom_state)


def progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description:<34}"),
        BarColumn(bar_width=24),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def train(env: Env, bar: Progress, name: str, label: str) -> dict[str, Any]:
    """Watch TrainingRun ``name`` through its pipeline steps until it ends."""
    task = bar.add_task(label, total=len(PIPELINE_STEPS), info="")

    def done() -> dict[str, Any] | None:
        st = env.k.status("tr", name)
        step = st.get("currentStep") or ""
        position = PIPELINE_STEPS.index(step) if step in PIPELINE_STEPS else 0
        finished = st.get("phase") in ("Succeeded", "Failed")
        bar.update(
            task,
            completed=len(PIPELINE_STEPS) if finished else position,
            info=f"{st.get('phase') or 'Pending'} {step} {st.get('bestMetric') or ''}",
        )
        return st if finished else None

    st: dict[str, Any] = loop.wait(done, within=600, what=f"TrainingRun {name} to finish")
    if st.get("phase") != "Succeeded":
        ready: dict[str, Any] = next(
            (c for c in st.get("conditions", []) if c["type"] == "Ready"), {}
        )
        raise SystemExit(f"TrainingRun {name} did not succeed: {ready.get('message')}")
    return st


def watch_drift(
    env: Env, bar: Progress, traffic: loop.Traffic, label: str, *, until: str
) -> dict[str, Any]:
    """Show the policy's signals against their thresholds until ``until`` (steady: a few
    evaluations; shifted: the retrain it starts)."""
    task = bar.add_task(label, total=None, info="")
    start, evaluations = time.monotonic(), set()

    def check() -> dict[str, Any] | None:
        st = env.k.status("dp", loop.POLICY)
        signals = "  ".join(
            f"{s['name']}{'[' + s['feature'] + ']' if s.get('feature') else ''}="
            f"{_num(s.get('value'))}/{_num(s.get('threshold'))} {s.get('outcome', '')}"
            for s in st.get("signals", [])
        )
        bar.update(task, info=f"{st.get('phase', '')} rows={traffic.rows}")
        stamp = st.get("lastEvaluatedAt")
        if stamp and stamp not in evaluations:  # one line per evaluation: value/threshold
            evaluations.add(stamp)
            bar.console.print(
                f"  {time.monotonic() - start:5.1f}s {st.get('phase', ''):10s} {signals}"
            )
        if until == "steady" and len(evaluations) >= 4 and time.monotonic() - start > 12:
            return st
        if until == "retrain" and st.get("retrains"):
            return st
        return None

    result: dict[str, Any] = loop.wait(check, within=240, what=f"the policy to {until}")
    bar.update(task, total=1, completed=1)
    return result


def canary(env: Env, bar: Progress, version: str) -> dict[str, Any]:
    task = bar.add_task(f"canary {version}", total=100, info="")
    seen: list[Any] = []

    def promoted() -> dict[str, Any] | None:
        st = env.k.status("md", loop.MODEL)
        weight = st.get("canary", {}).get("weight", 0)
        stable = st.get("stable", {}).get("modelVersion")
        step = (st.get("phase"), stable, weight)
        if [step] != seen:
            seen[:] = [step]
            bar.console.print(f"  canary: {st.get('phase')} stable={stable} {version} at {weight}%")
        bar.update(
            task,
            completed=100 if stable == version else weight,
            info=f"{st.get('phase')} stable={stable} "
            f"canary={st.get('canary', {}).get('modelVersion') or '-'} {weight}%",
        )
        history = [h for h in st.get("history", []) if h.get("toVersion") == version]
        if history and history[-1].get("result") != "Promoted":
            last = history[-1]
            raise SystemExit(
                f"the canary of {version} ended {last['result']}: {last.get('reason')}"
            )
        return st if stable == version else None

    return dict(loop.wait(promoted, within=300, what=f"{version} promoted"))


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.3g}"


def door(env: Env, console: Console, docs: dict[str, dict[str, Any]]) -> None:
    """A tenant reaching for another tenant's data and metrics is refused at apply."""
    console.rule("0. the door: what the admission webhook refuses")
    training = copy.deepcopy(docs["training"])
    training["metadata"]["name"] = "payments-stolen"
    training["spec"]["data"]["uri"] = f"file://{ARTIFACTS}/other-team/payments.csv"
    policy = copy.deepcopy(docs["policy"])
    policy["metadata"]["name"] = "peek"
    policy["spec"]["signals"] = [
        {
            "name": "theirs",
            "type": "promql",
            "query": 'sum(kubeloop_requests_total{namespace="other-team"})',
            "threshold": 1,
        }
    ]

    def probe() -> str:
        """The webhook answers once the operator's server is up and registered; a run taken
        before that is deleted again (the operator would refuse it as a condition)."""
        why = env.k.refusal(training)
        if not why:
            env.k.run("delete", "tr", "payments-stolen", "--ignore-not-found")
        return why if "denied the request" in why else ""

    refused = loop.wait(probe, within=60, what="the admission webhook")
    for what, message in (
        ("another team's data", refused),
        ("another team's metrics", env.k.refusal(policy)),
    ):
        if "denied the request" not in message:
            raise SystemExit(f"{what} was not refused at apply: {message!r}")
        console.print(f"{what}: refused: {message[:320]}")


def story(env: Env, console: Console) -> dict[str, float]:
    """The loop; returns the stage times (seconds)."""
    k, clock = env.k, loop.Clock()
    data_uri = loop.write_training_data(ARTIFACTS, NAMESPACE)
    held_out = demo_data.generate("after", 2000, seed=99)
    docs = loop.manifests(data_uri)
    door(env, console, docs)
    console.rule("1. train: TrainingRun payments")
    console.print(f"{loop.TRAIN_ROWS} payments before the shift at {data_uri}")
    with progress(console) as bar:
        k.apply(docs["training"])
        first = train(env, bar, loop.MODEL, "training payments (v1)")
    v1 = first["modelVersion"]
    console.print(f"registered {v1}: {first.get('bestMetric')}  (alias {loop.ALIAS})")

    console.rule("2. serve: ModelDeployment payments follows the alias")
    k.apply(docs["deployment"])
    st = loop.wait(lambda: loop.serving(k, v1), within=120, what=f"{v1} serving")
    traffic = loop.Traffic(st["url"])
    traffic.start()
    console.print(f"serving {v1} at {st['url']}; clients send payments and feed back the labels")

    console.rule("3. watch: DriftPolicy payments-drift on a steady stream")
    k.apply(docs["policy"])
    try:
        with progress(console) as bar:
            watch_drift(env, bar, traffic, "steady stream", until="steady")
        if loop.retrains(k):
            raise SystemExit("the policy retrained on a stream drawn from the reference")
        console.print("no breach on the steady stream: no retrain")

        console.rule("4. shift: travel season and a card-testing ring")
        console.print(
            f"features that move: {', '.join(demo_data.SHIFTED)}; the fraud pattern changes too"
        )
        traffic.regime = "after"
        clock.mark("shift")
        with progress(console) as bar:
            drifted = watch_drift(env, bar, traffic, "drift watch", until="retrain")
            clock.mark("acted")
            run_name = drifted["retrains"][0]["trainingRun"]
            run = k.get("tr", run_name) or {}
            console.print(
                f"retrain {run_name}: {run['metadata']['annotations'][RETRAIN_REASON_ANNOTATION]}"
            )
            second = train(env, bar, run_name, f"retraining ({run_name})")
            clock.mark("retrained")
            v2 = second["modelVersion"]
            canary(env, bar, v2)
            clock.mark("promoted")
        policy = loop.wait(
            lambda: (p := k.status("dp", loop.POLICY)).get("baselineVersion") == v2 and p,
            within=60,
            what="the policy to re-baseline",
        )
    finally:
        traffic.stopped.set()
    summary(
        env,
        console,
        drifted=drifted,
        policy=policy,
        held_out=held_out,
        versions=(v1, v2),
        traffic=traffic,
    )
    return {
        "detect_s": clock.between("shift", "acted"),
        "retrain_s": clock.between("acted", "retrained"),
        "rollout_s": clock.between("retrained", "promoted"),
        "total_s": clock.between("shift", "promoted"),
    }


def summary(
    env: Env,
    console: Console,
    *,
    drifted: dict[str, Any],
    policy: dict[str, Any],
    held_out: Any,
    versions: tuple[str, str],
    traffic: loop.Traffic,
) -> None:
    v1, v2 = versions
    k = env.k
    console.rule("summary")
    table = Table(title="drift when the policy acted (top features)")
    for column in ("feature", "statistic", "value", "threshold"):
        table.add_column(column)
    for f in drifted.get("topFeatures", []):
        table.add_row(f["feature"], f["statistic"], f"{f['value']:.3f}", f"{f['threshold']:.4f}")
    console.print(table)
    scores = {}
    for version in (v1, v2):
        uri = (k.get("mv", version) or {})["spec"]["artifact"]["uri"]
        scores[version] = demo_data.evaluate(uri, held_out)
    table = Table(title="post-shift held-out payments (2000 rows, never served)")
    for column in ("model", "accuracy", "F1 (fraud)"):
        table.add_column(column)
    for version, s in scores.items():
        table.add_row(version, f"{s['accuracy']:.3f}", f"{s['f1']:.3f}")
    console.print(table)
    gain = scores[v2]["accuracy"] - scores[v1]["accuracy"]
    console.print(
        f"the retrained model is {gain:+.3f} accuracy better "
        f"(the demo requires >= +{RETRAIN_MARGIN})"
    )
    md = k.status("md", loop.MODEL)
    for h in md.get("history", []):
        what = f"{h.get('fromVersion')} -> {h.get('toVersion')}"
        console.print(f"rollout: {what}: {h['result']} ({h.get('reason')})")
    for r in policy.get("retrains", []):
        console.print(f"retrain: {r['trainingRun']} -> {r.get('modelVersion')}: {r['outcome']}")
    console.print(
        f"client answers {dict(traffic.codes)}, label feedback answers {dict(traffic.feedback)}"
    )
    console.print(k.run("get", "kubeloop"))
    if gain < RETRAIN_MARGIN:
        raise SystemExit(f"the retrained model is only {gain:+.3f} accuracy better")


def main() -> int:
    console = Console(markup=False, highlight=False)  # feature names look like [markup]
    with environment(console) as env:
        times = story(env, console)
    console.rule("stage times")
    for key, value in times.items():
        console.print(f"{key:10s} {value:6.1f} s")
    (ARTIFACTS / NAMESPACE / "loop-times.json").write_text(json.dumps(times))
    console.print(f"operator log:  {env.cluster.state_dir / 'operator-demo.log'}")
    console.print(
        f"explore:       export KUBECONFIG={env.cluster.kubeconfig} "
        f"PATH={env.cluster.bin_dir}:$PATH; kubectl get kubeloop -n {NAMESPACE}; "
        f"helm history {RELEASE} -n {SYSTEM}"
    )
    console.print("stop:          make cluster-down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
