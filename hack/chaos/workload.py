"""What a chaos run asks of the operator, built from the integration tests' own helpers:

- ModelVersions in waves over the fault window (``test_model_version``): most Ready, some that
  must fail (a wrong digest, an artifact outside the tenant), some whose artifact appears only
  a wave later, aliases claimed by several versions of a model, some updated (a new generation)
  and some deleted while the faults go on; one wave lands while the watches are silent;
- TrainingRuns (``test_training_run``): tiny built-in-dataset runs of the local executor, two at
  a time, one with bad input, one whose spec changes while it runs (a second attempt);
- canaries (``test_model_deployment``: real models, real servers, real traffic): a broken
  version rolled back, then a good one promoted, with Prometheus stopped during one step and the
  canary's model server SIGKILLed during another;
- DriftPolicies: ``notify`` ones watching a canary, and the closed loop of
  ``test_drift_loop`` (a policy that sees the shift, retrains once and canaries the new model).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

from tests.integration.test_drift_loop import world_without_training
from tests.integration.test_model_deployment import Traffic, deployment, version_doc
from tests.integration.test_model_version import version, write_artifact
from tests.integration.test_training_run import training_run

from hack import demo_data, loop
from hack.chaos.faults import kill_model_server, model_server
from hack.chaos.invariants import Expected, Rollback
from hack.chaos.world import World
from kubeloop import reasons
from kubeloop.contract.artifact import digest
from kubeloop.serving.samples import train_tabular_model, write_broken_model

MV, TR, MD, DP = "ModelVersion", "TrainingRun", "ModelDeployment", "DriftPolicy"
IN_FLIGHT = 8  # creates at once
RETRAIN_COOLDOWN = "2m"  # between two retrains of the closed loop's policy


# --- ModelVersions ---------------------------------------------------------------------------


class VersionWaves:
    """The run's ModelVersions, planned up front (seeded) and created wave by wave."""

    def __init__(self, world: World, count: int) -> None:
        self.world = world
        rng = world.rng
        self.plan: list[tuple[str, str, int, str]] = []  # (name, model, number, variant)
        for i in range(count):
            model, number = f"m{i // 10:03d}", i % 10 + 1
            draw = rng.random()
            variant = (
                "bad-digest"
                if draw < 0.04
                else "outside"
                if draw < 0.07
                else "late"
                if draw < 0.11
                else "unverified"
                if draw < 0.3
                else "good"
            )
            self.plan.append((f"{model}-v{number}", model, number, variant))
        self.late: list[tuple[str, int]] = []  # artifacts still to write
        self.created: list[str] = []
        self.deleted: set[str] = set()

    def wave(self, index: int, waves: int) -> list[tuple[str, str, int, str]]:
        size = -(-len(self.plan) // waves)
        return self.plan[index * size : (index + 1) * size]

    def _body(self, name: str, model: str, number: int, variant: str) -> dict[str, Any]:
        world = self.world
        root, ns = world.artifact_root, world.namespace
        aliases = ["latest"] if number >= 9 else ["staging"] if number == 1 else []
        if variant == "outside":
            uri = write_artifact(root, "another-tenant", model, number)
        elif variant == "late":
            uri = f"file://{root / ns / model / f'v{number}'}"
            self.late.append((model, number))
        else:
            uri = write_artifact(root, ns, model, number)
        doc = version(name, model, number, uri, aliases=aliases)
        if variant in ("good", "bad-digest"):
            real = digest(Path(uri.removeprefix("file://")))
            doc["spec"]["artifact"]["sha256"] = real if variant == "good" else "0" * 64
        return doc

    @staticmethod
    def expected(name: str, variant: str) -> Expected:
        if variant == "bad-digest":
            return Expected(MV, name, False, reasons.ARTIFACT_DIGEST_MISMATCH, "Failed")
        if variant == "outside":
            return Expected(MV, name, False, reasons.ARTIFACT_OUTSIDE_TENANT, "Failed")
        return Expected(MV, name, True, phase="Ready")

    async def create(self, plan: list[tuple[str, str, int, str]]) -> None:
        queue = list(plan)

        async def worker() -> None:
            while queue:
                name, model, number, variant = queue.pop(0)
                body = await asyncio.to_thread(self._body, name, model, number, variant)
                await self.world.create(MV, body, self.expected(name, variant))
                self.created.append(name)

        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))

    def write_late(self) -> None:
        """The artifacts of the versions created before them: they register on a retry."""
        for model, number in self.late:
            write_artifact(self.world.artifact_root, self.world.namespace, model, number)
        self.late.clear()

    async def churn(self) -> None:
        """Update some versions created so far (one more alias: a new generation) and delete
        some others (they must be gone)."""
        world, rng = self.world, self.world.rng
        alive = [n for n in self.created if n not in self.deleted]
        for name in rng.sample(alive, k=min(len(alive), max(1, len(alive) // 20))):
            mv = await world.get(MV, name)
            if mv is None:
                continue
            aliases = [*mv["spec"].get("aliases", []), "candidate"]
            await world.patch(MV, name, {"spec": {"aliases": sorted(set(aliases))}})
        alive = [n for n in self.created if n not in self.deleted]
        for name in rng.sample(alive, k=min(len(alive), max(1, len(alive) // 30))):
            await world.delete(MV, name)
            self.deleted.add(name)
            world.expect(Expected(MV, name, None))


async def version_waves(world: World, waves: VersionWaves) -> None:
    """Create the waves over the fault window; the middle one while the watches are silent."""
    cfg = world.cfg
    silent_wave = cfg.waves // 2
    for index in range(cfg.waves):
        await world.at(index * cfg.fault_window_s / cfg.waves)
        plan = waves.wave(index, cfg.waves)
        if index == silent_wave and cfg.silence_s > 0 and world.proxy is not None:
            fault = world.faults.begin("silence", f"watches silent {cfg.silence_s:g}s")
            world.proxy.silence(cfg.silence_s)
            world.notes["silent_wave"] = [name for name, *_ in plan]
            await waves.create(plan)
            fault.end = fault.start + cfg.silence_s
        else:
            await waves.create(plan)
        await asyncio.to_thread(waves.write_late)
        if index:
            await waves.churn()
        world.log(f"  {world.elapsed():6.1f}s wave {index + 1}/{cfg.waves}: {len(plan)} versions")


async def probe(world: World) -> None:
    """One ModelVersion whose first status write the proxy refuses with a 409, created after
    the last kill (no restart re-handles it): it converges only if a refused write is retried."""
    if world.proxy is None:
        return
    name = "probe-v1"
    world.proxy.refuse_first(f"/modelversions/{name}/status")
    uri = write_artifact(world.artifact_root, world.namespace, "probe", 1)
    await world.create(MV, version(name, "probe", 1, uri), Expected(MV, name, True, phase="Ready"))


# --- TrainingRuns ------------------------------------------------------------------------------


async def trainings(world: World) -> None:
    cfg = world.cfg
    bad = training_run("tr-bad-input", data={"uri": "builtin://breast-cancer", "target": "outcome"})
    await world.create(
        TR, bad, Expected(TR, "tr-bad-input", False, reasons.INVALID_INPUT, phase="Failed")
    )
    two_at_a_time = asyncio.Semaphore(2)

    async def one(index: int) -> None:
        name = f"tr-{index}"
        async with two_at_a_time:
            body = training_run(name, registration={"modelName": "cancer", "alias": "candidate"})
            await world.create(TR, body, Expected(TR, name, True, phase="Succeeded"))
            if index == 0 and cfg.respec_training:
                await world.until(
                    lambda: _phase_in(world, name, ("Running",)), within=240, what=f"{name} runs"
                )
                await world.patch(TR, name, {"spec": {"model": {"epochs": 3}}})
            await world.until(
                lambda: _phase_in(world, name, ("Succeeded", "Failed")),
                within=600,
                what=f"{name} ends",
                every=1.0,
            )
            world.log(f"  {world.elapsed():6.1f}s {name} ended")

    await asyncio.gather(*(one(i) for i in range(cfg.training_runs)))


async def _phase_in(world: World, name: str, phases: tuple[str, ...]) -> bool:
    return (await world.status(TR, name)).get("phase") in phases


# --- canaries --------------------------------------------------------------------------------


def train_churn_models(root: Path) -> dict[str, Path]:
    """The canaries' models, trained once: two healthy versions and a broken one."""
    return {
        "v1": train_tabular_model(root / "v1", seed=1),
        "v2": train_tabular_model(root / "v2", seed=2),
        "v3": write_broken_model(root / "v3"),
    }


async def register_churn(world: World, models: dict[str, Path]) -> None:
    """churn-v1..v3 under the tenant's prefix (what test_model_deployment's ``register`` does)."""
    for name, source in models.items():
        folder = world.artifact_root / world.namespace / "churn" / name
        await asyncio.to_thread(shutil.copytree, source, folder, dirs_exist_ok=True)
        doc = version_doc(int(name[1:]), folder, metrics={"f1": 0.95})
        await world.create(MV, doc, Expected(MV, doc["metadata"]["name"], True, phase="Ready"))


async def md_status(world: World, name: str) -> dict[str, Any]:
    return await world.status(MD, name)


async def serving(world: World, name: str, version: str) -> dict[str, Any] | None:
    st = await md_status(world, name)
    ok = st.get("phase") == "Serving" and st.get("url")
    return st if ok and (st.get("stable") or {}).get("modelVersion") == version else None


async def point_to(world: World, name: str, version: str) -> None:
    await world.patch(MD, name, {"spec": {"model": {"modelVersion": {"name": version}}}})


async def canary(world: World, index: int, *, outage: bool, kill_server: bool) -> None:
    """A broken canary rolled back, then a good one promoted (with the faults of its roles)."""
    name = f"churn-{index}"
    doc = deployment("churn-v1")
    doc["metadata"]["name"] = name
    doc["spec"]["rollout"]["interval"] = world.cfg.canary_interval
    await world.create(MD, doc, Expected(MD, name, True, phase="Serving", stable="churn-v2"))
    st = await world.until(lambda: serving(world, name, "churn-v1"), within=240, what=f"{name}")
    world.log(f"  {world.elapsed():6.1f}s {name} serves churn-v1")
    with Traffic(st["url"]) as traffic:
        world.notes.setdefault("client_traffic", {})[name] = traffic.codes  # what clients saw
        await point_to(world, name, "churn-v3")

        async def rolled_back() -> dict[str, Any] | None:
            s = await md_status(world, name)
            last = (s.get("history") or [{}])[-1]
            done = s.get("phase") == "RolledBack" and last.get("toVersion") == "churn-v3"
            return s if done else None

        await world.until(rolled_back, within=240, what=f"{name} rolls churn-v3 back")
        seen_at = time.time()
        port = _port_of(world, name, "churn-v3")
        world.log(f"  {world.elapsed():6.1f}s {name} rolled churn-v3 back")
        await point_to(world, name, "churn-v2")
        world.rollbacks.append(Rollback(name, "churn-v3", seen_at, port, time.time()))
        if outage and world.prometheus is not None:
            await world.until(lambda: _at_step(world, name, 1), within=240, what=f"{name} step 1")
            world.log(f"  {world.elapsed():6.1f}s Prometheus stopped ({name} at step 1)")
            await world.prometheus.outage(world.cfg.prometheus_outage_s, f"{name} at step 1")
            world.log(f"  {world.elapsed():6.1f}s Prometheus back")
        if kill_server:
            await world.until(lambda: _at_step(world, name, 2), within=300, what=f"{name} step 2")
            await asyncio.sleep(1)
            fault = kill_model_server(
                world.state_dir, world.namespace, name, "churn-v2", world.faults
            )
            world.log(f"  {world.elapsed():6.1f}s SIGKILL {fault.detail if fault else '(none)'}")
        await world.until(
            lambda: serving(world, name, "churn-v2"), within=400, what=f"{name} promotes"
        )
        world.log(f"  {world.elapsed():6.1f}s {name} promoted churn-v2")


def _port_of(world: World, deployment_name: str, version_name: str) -> int:
    """The port the backend recorded for a server (the recorder keeps every record seen)."""
    record = model_server(world.state_dir, world.namespace, deployment_name, version_name)
    port = int(record.get("port") or 0)
    if port or world.recorder is None:
        return port
    seen = [r for _, v, r in world.recorder.server_records[deployment_name] if v == version_name]
    return int(seen[-1].get("port") or 0) if seen else 0


async def _at_step(world: World, name: str, step: int) -> bool:
    st = await md_status(world, name)
    canary_ = st.get("canary") or {}
    return canary_.get("modelVersion") == "churn-v2" and int(st.get("currentStep") or 0) >= step


async def notify_policy(world: World, index: int) -> None:
    """A DriftPolicy that only watches the first canary (mode notify)."""
    doc = json.loads(json.dumps(loop.manifests("file:///unused")["policy"]))
    name = f"watch-{index}"
    doc["metadata"]["name"] = name
    doc["spec"]["target"] = {"name": "churn-0"}
    # A raw PromQL signal (scoped to the namespace by the operator): the request rate, far
    # below its threshold; it needs Prometheus, and says so while Prometheus is down.
    rate = 'sum(rate(kubeloop_requests_total{model="churn-0"}[30s]))'
    doc["spec"]["signals"] = [
        {"name": "requests", "type": "promql", "query": rate, "threshold": 1_000_000}
    ]
    doc["spec"]["action"] = {"mode": "notify"}
    await world.create(DP, doc, Expected(DP, name, True))


# --- the closed loop ----------------------------------------------------------------------------


async def train_payments(root: Path) -> dict[str, Any]:
    """The ``payments`` model trained by the local executor, as test_drift_loop's ``trained``."""
    data = demo_data.write_training_csv(root / "before.csv", loop.TRAIN_ROWS, seed=1)
    result = await demo_data.train_locally(root, "payments", f"file://{data}")
    manifest = Path(result.model_uri.removeprefix("file://")).parent / "modelversion.json"
    return dict(json.loads(manifest.read_text()))


async def drift_loop(world: World, trained: asyncio.Task[dict[str, Any]]) -> None:
    """Serve payments-v1, shift the world, and wait for the retrain's canary to be promoted."""
    assert world.cluster is not None
    k = loop.Kubectl(world.cluster.bin_dir / "kubectl", world.cluster.kubeconfig, world.namespace)
    model = await trained
    v1, docs = await world.persist(
        lambda: asyncio.to_thread(
            world_without_training,
            k,
            world.namespace,
            world.artifact_root,
            model,
            hold="8s",
            cooldown=RETRAIN_COOLDOWN,
        ),
        "the payments world",
        also=(RuntimeError,),  # kubectl, while the API server restarts
    ) or ("", {})
    if world.cfg.probe_conflict and world.proxy is not None:
        # The policy's create of its first retrain is refused once (see probe()).
        world.proxy.refuse_first("/trainingruns", body_fragment=f'"{loop.POLICY}-retrain-1"')
    world.expect(Expected(MV, v1, True, phase="Ready"))
    world.expect(Expected(TR, loop.MODEL, False, reasons.SUSPENDED, phase="Suspended"))
    world.expect(Expected(MD, loop.MODEL, True, phase="Serving", stable="payments-v2"))
    world.expect(Expected(DP, loop.POLICY, True))
    st = await world.until(lambda: serving(world, loop.MODEL, v1), within=240, what="payments")
    traffic = loop.Traffic(st["url"])
    world.notes.setdefault("client_traffic", {})[loop.MODEL] = traffic.codes
    traffic.start()
    try:
        await world.persist(
            lambda: asyncio.to_thread(k.apply, docs["policy"]), "the policy", also=(RuntimeError,)
        )

        async def conclusive() -> bool:
            history = (await world.status(DP, loop.POLICY)).get("history") or []
            return len([h for h in history if h["outcome"] != "Inconclusive"]) >= 3

        await world.until(conclusive, within=300, what="three conclusive evaluations")
        traffic.regime = "after"
        world.log(f"  {world.elapsed():6.1f}s the payments world shifts")

        async def retrain() -> str:
            retrains = (await world.status(DP, loop.POLICY)).get("retrains") or []
            return str(retrains[0]["trainingRun"]) if retrains else ""

        run = await world.until(retrain, within=300, what="a retrain")
        world.log(f"  {world.elapsed():6.1f}s retrain {run}")
        await world.until(
            lambda: serving(world, loop.MODEL, "payments-v2"),
            within=900,
            what="payments-v2 promoted",
            every=1.0,
        )
        world.log(f"  {world.elapsed():6.1f}s payments-v2 promoted")
    finally:
        traffic.stopped.set()


async def registered_children(world: World) -> None:
    """Expect what the operator created: each registered version Ready, each retrain ended."""
    for mv in await world.items(MV):
        name = mv["metadata"]["name"]
        if (MV, name) not in world.expected:
            world.expect(Expected(MV, name, True, phase="Ready"))
    for tr in await world.items(TR):
        name = tr["metadata"]["name"]
        if (TR, name) not in world.expected:
            world.expect(Expected(TR, name, True, phase="Succeeded"))
