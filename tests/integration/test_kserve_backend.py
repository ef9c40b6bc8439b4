"""KServeBackend against a real API server with KServe's own InferenceService CRD installed.

KServe's controller cannot run here (no Knative, no webhooks), so what is tested is what the API
server decides: every InferenceService we generate passes KServe's real OpenAPI schema (with
Strict field validation, so nothing is silently pruned), each canary step and rollback lands in
the object as KServe expects it, and the status KServe would write is read back correctly — the
status is written by :class:`FakeKServeController`, a stand-in for KServe's controller.

KServe's CRD file is read from ``../shared/fixtures/kserve/`` beside the checkout, or from the
file ``$KUBELOOP_KSERVE_CRD`` names; without it, the tests that install it skip and say so.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import pytest

from kubeloop.api.model_deployment import ModelDeployment
from kubeloop.backends.kube import MODEL_DEPLOYMENTS, ApiError, KubeClient
from kubeloop.backends.serving_kserve import INFERENCE_SERVICES, KServeBackend
from kubeloop.planning.inference_service import build_inference_service
from kubeloop.planning.placement import Placement, Served
from tests.conftest import ROOT
from tests.integration.conftest import LocalCluster

CRD_FILE = "serving.kserve.io_inferenceservices.yaml"
# KServe's own CRD is a data file kept beside the checkout (CI and the shared workspace have it
# there), not in the project; KUBELOOP_KSERVE_CRD, when set, names the file to use instead.
CRD_VARIABLE = "KUBELOOP_KSERVE_CRD"
KSERVE_CRD = Path(
    os.environ.get(CRD_VARIABLE) or ROOT.parent / "shared" / "fixtures" / "kserve" / CRD_FILE
)


def _missing_crd() -> str:
    """Why KServe's CRD cannot be installed; '' when it can."""
    if KSERVE_CRD.is_file():
        return ""
    source = f"{CRD_VARIABLE}={KSERVE_CRD}" if os.environ.get(CRD_VARIABLE) else str(KSERVE_CRD)
    return (
        f"KServe's InferenceService CRD is missing ({source} is not a file): set {CRD_VARIABLE} "
        f"to KServe's {CRD_FILE} (config/crd/full/ in the kserve/kserve repository) to run "
        "the tests that validate against it"
    )


MISSING_CRD = _missing_crd()
# On each test that installs the CRD, so that without it the test skips at collection, before
# a control plane is started for it; the fixture skips too, for a test that lacks the mark.
needs_kserve_crd = pytest.mark.skipif(bool(MISSING_CRD), reason=MISSING_CRD)

IMAGE = "ghcr.io/kubeloop/serving:test"
V1 = Served("churn-v1", "s3://models/ns/churn/v1")
V2 = Served("churn-v2", "s3://models/ns/churn/v2")
STEPS = (10, 25, 50, 100)


@pytest.fixture(scope="module")
def kserve_crd(crds: LocalCluster) -> LocalCluster:
    """KServe's own InferenceService CRD, installed the way a platform team installs KServe."""
    if MISSING_CRD:
        pytest.skip(MISSING_CRD)
    # Server-side: the CRD is far larger than the last-applied annotation may be.
    crds.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(KSERVE_CRD))
    # A CRD created a moment ago may have no status.conditions yet, which `kubectl wait` reports
    # as an error rather than waiting: retry until it is Established.
    deadline = time.monotonic() + 60
    while True:
        waited = crds.kubectl(
            "wait",
            "--for=condition=Established",
            "--timeout=10s",
            "crd/inferenceservices.serving.kserve.io",
            check=False,
        )
        if waited.returncode == 0:
            break
        assert time.monotonic() < deadline, waited.stderr
        time.sleep(0.5)
    return crds


@pytest.fixture
def backend(kube: KubeClient, kserve_crd: LocalCluster) -> KServeBackend:
    return KServeBackend(kube, image=IMAGE)


async def model_deployment(
    kube: KubeClient, namespace: str, name: str = "churn", **serving: Any
) -> ModelDeployment:
    """A real ModelDeployment object (no operator runs), so the ownerReference uid is valid."""
    created = await kube.create(
        MODEL_DEPLOYMENTS,
        namespace,
        {
            "apiVersion": "kubeloop.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": name},
            "spec": {"model": {"modelVersion": {"name": "churn-v1"}}, "serving": serving},
        },
    )
    return ModelDeployment.model_validate(created)


async def read(kube: KubeClient, md: ModelDeployment) -> dict[str, Any]:
    return await kube.get(INFERENCE_SERVICES, md.metadata.namespace, md.metadata.name)


def version_of(predictor: dict[str, Any]) -> str:
    args: list[str] = predictor["containers"][0]["args"]
    return args[args.index("--model-version") + 1]


class FakeKServeController:
    """A FAKE standing in for KServe's controller, which cannot run here (it needs Knative or
    Gateway API and its webhooks). It writes the status subresource the way KServe does:
    observedGeneration, the Ready/PredictorReady conditions, the url, Knative's revision
    traffic (Serverless) and per-canary statuses (RawDeployment)."""

    def __init__(self, kube: KubeClient) -> None:
        self.kube = kube

    async def reconcile(self, md: ModelDeployment, *, ready: bool = True) -> dict[str, Any]:
        isvc = await read(self.kube, md)
        spec, meta = isvc["spec"], isvc["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        url = f"http://{name}.{namespace}.example.com"
        status: dict[str, Any] = {
            "observedGeneration": meta["generation"],
            "url": url,
            "address": {"url": f"http://{name}-predictor.{namespace}.svc.cluster.local"},
            "conditions": [
                self._condition("PredictorReady", ready),
                self._condition("Ready", ready),
            ],
        }
        mode = meta["annotations"]["serving.kserve.io/deploymentMode"]
        if mode == "Serverless":
            percent = spec["predictor"].get("canaryTrafficPercent")
            traffic = [
                {
                    "revisionName": f"{name}-predictor-00002",
                    "latestRevision": True,
                    "tag": "latest",
                    "percent": 100 if percent is None else percent,
                }
            ]
            if percent is not None and percent < 100:
                traffic.append(
                    {
                        "revisionName": f"{name}-predictor-00001",
                        "latestRevision": False,
                        "tag": "prev",
                        "percent": 100 - percent,
                    }
                )
            status["components"] = {
                "predictor": {
                    "latestCreatedRevision": f"{name}-predictor-00002",
                    "latestReadyRevision": f"{name}-predictor-0000{2 if ready else 1}",
                    "url": url,
                    "traffic": traffic,
                }
            }
        else:
            status["canaryStatuses"] = [
                {
                    "name": entry["predictor"]["name"],
                    "ready": ready,
                    "trafficPercent": entry["trafficPercent"],
                }
                for entry in spec.get("canary", [])
            ]
        return await self.kube.patch(
            INFERENCE_SERVICES, namespace, name, {"status": status}, subresource="status"
        )

    @staticmethod
    def _condition(type_: str, ready: bool) -> dict[str, str]:
        condition = {
            "type": type_,
            "status": "True" if ready else "False",
            "lastTransitionTime": "2026-08-01T00:00:00Z",
        }
        if not ready:
            condition |= {"reason": "ModelLoadFailed", "message": "model churn-v2 failed to load"}
        return condition


async def strict_dry_run(kube: KubeClient, body: dict[str, Any]) -> dict[str, Any]:
    """Create ``body`` as a dry run with Strict field validation: an unknown field (which a
    structural schema would otherwise prune silently) is an error, like a schema violation."""
    return await kube.request(
        "POST",
        INFERENCE_SERVICES.path(body["metadata"]["namespace"]),
        params={"dryRun": "All", "fieldValidation": "Strict"},
        body=body,
    )


# --- the real schema accepts what we generate ------------------------------------------------


@needs_kserve_crd
@pytest.mark.parametrize("mode", ["Serverless", "RawDeployment"])
async def test_kserve_schema_accepts_every_shape(
    kube: KubeClient, namespace: str, kserve_crd: LocalCluster, mode: str
) -> None:
    md = await model_deployment(
        kube,
        namespace,
        deploymentMode=mode,
        grpc=True,
        minReplicas=0 if mode == "Serverless" else 1,
        maxReplicas=3,
        batching={"enabled": True, "maxBatchSize": 16},
        cache={"enabled": True},
        resources={
            "cpu": "500m",
            "memory": "1Gi",
            "gpu": 1,
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [
                {
                    "key": "nvidia.com/gpu",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 30,
                }
            ],
            "queueName": "team-a",
        },
    )
    for placement in (Placement(V1), Placement(V1, V2, 0), *(Placement(V1, V2, w) for w in STEPS)):
        body = build_inference_service(md, placement, image=IMAGE)
        accepted = await strict_dry_run(kube, body)
        assert accepted["spec"]["predictor"]["containers"][0]["resources"]["limits"] == {
            "cpu": "500m",
            "memory": "1Gi",
            "nvidia.com/gpu": "1",
        }
    for scale_metric, target in (("cpu", 70), ("rps", 50)):
        scaled = md.model_copy(deep=True)
        scaled.spec.serving = scaled.spec.serving.model_copy(
            update={"scale_metric": scale_metric, "scale_target": target}
        )
        await strict_dry_run(kube, build_inference_service(scaled, Placement(V1), image=IMAGE))


@needs_kserve_crd
async def test_the_schema_is_really_enforced(
    kube: KubeClient, namespace: str, kserve_crd: LocalCluster
) -> None:
    """A control: the same path refuses what KServe's schema forbids, so acceptance means
    something."""
    md = await model_deployment(kube, namespace)
    body = build_inference_service(md, Placement(V1, V2, 10), image=IMAGE)
    too_much = copy.deepcopy(body)
    too_much["spec"]["canary"][0]["trafficPercent"] = 101
    with pytest.raises(ApiError) as info:
        await strict_dry_run(kube, too_much)
    assert info.value.status == 422
    assert "trafficPercent" in info.value.message
    unknown = copy.deepcopy(body)
    unknown["spec"]["predictor"]["canaryPercent"] = 10
    with pytest.raises(ApiError, match="canaryPercent"):
        await strict_dry_run(kube, unknown)


# --- canary steps and rollback, read back from the API server --------------------------------


@needs_kserve_crd
async def test_serverless_canary_steps_and_rollback(
    kube: KubeClient, namespace: str, backend: KServeBackend
) -> None:
    md = await model_deployment(kube, namespace, deploymentMode="Serverless")
    await backend.apply(md, Placement(V1))
    predictor = (await read(kube, md))["spec"]["predictor"]
    assert version_of(predictor) == "churn-v1"
    assert "canaryTrafficPercent" not in predictor

    for weight in STEPS:
        await backend.apply(md, Placement(V1, V2, weight))
        isvc = await read(kube, md)
        predictor = isvc["spec"]["predictor"]
        assert predictor["canaryTrafficPercent"] == weight
        assert version_of(predictor) == "churn-v2"
        assert "canary" not in isvc["spec"]

    await backend.apply(md, Placement(V1, V2, 0))  # KServe's rollback: previous revision, 100%
    assert (await read(kube, md))["spec"]["predictor"]["canaryTrafficPercent"] == 0

    await backend.apply(md, Placement(V1))
    predictor = (await read(kube, md))["spec"]["predictor"]
    assert version_of(predictor) == "churn-v1"
    assert "canaryTrafficPercent" not in predictor


@needs_kserve_crd
async def test_raw_deployment_canary_steps_rollback_and_promotion(
    kube: KubeClient, namespace: str, backend: KServeBackend
) -> None:
    md = await model_deployment(kube, namespace, minReplicas=2, maxReplicas=4)
    await backend.apply(md, Placement(V1))
    isvc = await read(kube, md)
    assert "canary" not in isvc["spec"]
    assert isvc["spec"]["predictor"]["name"] == "churn-v1"

    for weight in STEPS:
        await backend.apply(md, Placement(V1, V2, weight))
        spec = (await read(kube, md))["spec"]
        assert version_of(spec["predictor"]) == "churn-v1"
        assert spec["predictor"]["name"] == "churn-v1"
        assert "canaryTrafficPercent" not in spec["predictor"]
        (entry,) = spec["canary"]
        assert entry["trafficPercent"] == weight
        assert entry["predictor"]["name"] == "churn-v2"
        assert version_of(entry["predictor"]) == "churn-v2"

    for rollback in (Placement(V1, V2, 0), Placement(V1)):
        await backend.apply(md, Placement(V1, V2, 25))
        await backend.apply(md, rollback)
        spec = (await read(kube, md))["spec"]
        assert "canary" not in spec, rollback
        assert version_of(spec["predictor"]) == "churn-v1"

    await backend.apply(md, Placement(V1, V2, 100))
    await backend.apply(md, Placement(V2))  # promotion: the stable takes the canary's name
    spec = (await read(kube, md))["spec"]
    assert "canary" not in spec
    assert spec["predictor"]["name"] == "churn-v2"
    assert version_of(spec["predictor"]) == "churn-v2"


@needs_kserve_crd
async def test_owned_labelled_and_annotated(
    kube: KubeClient, namespace: str, backend: KServeBackend
) -> None:
    md = await model_deployment(kube, namespace, resources={"queueName": "team-a"})
    await backend.apply(md, Placement(V1))
    meta = (await read(kube, md))["metadata"]
    (owner,) = meta["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == (
        "ModelDeployment",
        "churn",
        md.metadata.uid,
    )
    assert owner["controller"] is True
    assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert meta["annotations"]["prometheus.io/scrape"] == "true"
    managers = {f["manager"] for f in meta["managedFields"]}
    assert kube.field_manager in managers


# --- status: what KServe (here its fake) reports ----------------------------------------------


@needs_kserve_crd
@pytest.mark.parametrize("mode", ["Serverless", "RawDeployment"])
async def test_ready_and_url_from_kserve_status(
    kube: KubeClient, namespace: str, backend: KServeBackend, mode: str
) -> None:
    md = await model_deployment(kube, namespace, deploymentMode=mode)
    kserve = FakeKServeController(kube)

    state = await backend.apply(md, Placement(V1))
    assert not state.stable_ready
    assert "generation" in state.message

    await kserve.reconcile(md)
    state = await backend.apply(md, Placement(V1))
    assert state.stable_ready
    assert not state.canary_ready
    assert state.url == f"http://churn.{namespace}.example.com"
    assert state.message == ""

    canary = Placement(V1, V2, 10)
    state = await backend.apply(md, canary)
    assert not state.canary_ready  # a new generation: KServe has not seen it yet

    await kserve.reconcile(md, ready=False)
    state = await backend.apply(md, canary)
    assert not state.canary_ready
    assert "ModelLoadFailed" in state.message
    assert "failed to load" in state.message

    await kserve.reconcile(md)
    state = await backend.apply(md, canary)
    assert state.stable_ready
    assert state.canary_ready
    assert state.url.startswith("http://churn.")


@needs_kserve_crd
async def test_delete_is_idempotent(
    kube: KubeClient, namespace: str, backend: KServeBackend
) -> None:
    md = await model_deployment(kube, namespace)
    await backend.apply(md, Placement(V1))
    await backend.delete(md)
    await backend.delete(md)  # NotFound is fine
    with pytest.raises(ApiError) as info:
        await read(kube, md)
    assert info.value.status == 404


@needs_kserve_crd
async def test_api_errors_pass_through(
    kube: KubeClient, namespace: str, backend: KServeBackend
) -> None:
    md = await model_deployment(kube, namespace)
    md.metadata.namespace = f"{namespace}-missing"  # no such namespace
    with pytest.raises(ApiError) as info:
        await backend.apply(md, Placement(V1))
    assert info.value.status == 404
