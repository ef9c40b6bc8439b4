"""Build the KServe InferenceService that serves a ModelDeployment (pure: no I/O).

One InferenceService (``serving.kserve.io/v1beta1``) per ModelDeployment, with the same name and
namespace, owned by it. The predictor is a custom container running our serving runtime
(``images/serving``, ``settings.serving_image``); KServe's storage initializer downloads the
artifact named by the container's ``STORAGE_URI`` into ``/mnt/models`` (KServe's documented
mechanism for custom predictors), so the artifact must live where a pod can fetch it: ``s3://``,
``gs://``, ``pvc://`` (or another scheme KServe's storage initializer speaks). A ``file://``
artifact only exists on the operator's filesystem and is refused with a ``ValueError``.

How a canary is expressed depends on ``spec.serving.deploymentMode``; the two modes use
different KServe APIs:

Serverless (Knative)
    KServe splits traffic between *revisions*. The predictor carries the CANARY version and
    ``canaryTrafficPercent: <weight>``; Knative keeps the previous rolled-out revision (the
    stable version) serving the remaining ``100 - weight`` percent. With no canary the predictor
    carries the stable version and no ``canaryTrafficPercent`` (100% to the latest revision).
    A canary present at weight 0 keeps the canary revision with ``canaryTrafficPercent: 0``:
    KServe's own rollback, which sends everything back to the previous revision at once without
    building a new one. Caveat (Knative, not ours): once the canary is dropped (``canary=None``)
    the predictor template changes back to the stable version, Knative creates a new revision,
    and until that revision is Ready ``latestRevision`` still points at the newest *ready*
    revision — the abandoned canary. Hold the weight-0 placement until the stable is trusted.

RawDeployment (KServe >= 0.20, ``spec.canary``, kserve PR #5672)
    ``spec.canary`` is a list of ``{trafficPercent: 0..100, predictor: PredictorSpec}``; every
    canary predictor must carry a ``name`` (``^[a-z]([-a-z0-9]*[a-z0-9])?$``) and KServe runs it
    as its own Deployment and Service ``<isvc>-<name>-predictor``; the stable ``spec.predictor``
    gets ``100 - sum(trafficPercent)``. KServe's webhook requires unique names, a sum <= 100 and
    no autoscaling fields on a canary (its replicas are ``minReplicas`` or derived from the
    traffic share of the stable's ``minReplicas``). Promotion without a restart is done by
    giving the stable predictor the canary's ``name`` (KServe retargets the stable to the canary
    Deployment), and a ``predictor.name`` change is only accepted together with a model
    (storage URI) change. So here every predictor is named after its ModelVersion
    (:func:`predictor_name`): the stable predictor is named after the stable version, the single
    canary entry after the canary version with ``trafficPercent: <weight>``; promoting (stable :=
    canary version) keeps the name and the pods. Weight 0 or no canary → no ``spec.canary``,
    which is KServe's rollback (it deletes the orphaned canary Deployment).

Autoscaling: Serverless uses Knative's KPA, which scales on ``concurrency`` or ``rps``; ``cpu``
switches the revision to Knative's HPA class. RawDeployment uses a Kubernetes HPA, which scales
on cpu/memory only; a ``concurrency``/``rps`` target there needs KEDA and external metrics, so
the builder leaves KServe's default (CPU) autoscaling in place rather than write a metric the
HPA would misread.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable
from typing import Any

from kubeloop import API_VERSION
from kubeloop.api.common import ComputeResources, Toleration
from kubeloop.api.model_deployment import ModelDeployment, Serving
from kubeloop.contract.labels import KUEUE_QUEUE_LABEL
from kubeloop.planning.naming import child_name
from kubeloop.planning.placement import Placement, Served, readiness_path, runtime_options

KSERVE_API_VERSION = "serving.kserve.io/v1beta1"
KIND = "InferenceService"

MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts STORAGE_URI
HTTP_PORT = 8080
GRPC_PORT = 8081
CONTAINER_NAME = "kserve-container"  # the name KServe's storage initializer injector looks for

DEPLOYMENT_MODE = "serving.kserve.io/deploymentMode"
KNATIVE_AUTOSCALER_CLASS = "autoscaling.knative.dev/class"
KNATIVE_HPA_CLASS = "hpa.autoscaling.knative.dev"
MANAGED_BY = "app.kubernetes.io/managed-by"
MODEL_DEPLOYMENT_LABEL = "kubeloop.dev/model-deployment"
MODEL_VERSION_LABEL = "kubeloop.dev/model-version"

# Schemes KServe's storage initializer downloads from (a pod cannot read the operator's disk).
CLUSTER_SCHEMES = frozenset({"s3", "gs", "pvc", "https", "http", "hdfs", "webhdfs", "hf", "oci"})

_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_SERVICE_NAME_MAX = 63  # <isvc>-<predictor name>-predictor is a Service name (DNS-1035 label)


def build_inference_service(
    md: ModelDeployment,
    placement: Placement,
    *,
    image: str,
    storage_uri_of: Callable[[Served], str] | None = None,
) -> dict[str, Any]:
    """The InferenceService that serves ``placement`` for ``md`` (see the module docstring)."""
    name, namespace = md.metadata.name, md.metadata.namespace
    if not _NAME.match(name):
        raise ValueError(
            f"metadata.name: {name!r} cannot name a KServe InferenceService: it must match "
            f"{_NAME.pattern} (start with a letter)"
        )
    if not md.metadata.uid:
        raise ValueError(
            f"metadata.uid of ModelDeployment {namespace}/{name} is empty: build the "
            "InferenceService from the object as read from the API server (its ownerReference "
            "needs the uid)"
        )
    serving = md.spec.serving
    uri_of = storage_uri_of or (lambda served: served.uri)
    canary = placement.canary
    if canary is not None and canary.version == placement.stable.version:
        canary = None  # the same version on both sides is no canary at all
    weight = placement.canary_weight
    if not 0 <= weight <= 100:
        raise ValueError(f"canary weight {weight} is outside 0..100")

    predictor: dict[str, Any]
    canaries: list[dict[str, Any]] = []
    if serving.deployment_mode == "Serverless":
        if canary is None:
            predictor = _predictor(md, placement, placement.stable, uri_of, image)
        else:
            predictor = _predictor(md, placement, canary, uri_of, image)
            predictor["canaryTrafficPercent"] = weight
    else:
        predictor = _predictor(md, placement, placement.stable, uri_of, image)
        predictor["name"] = predictor_name(name, placement.stable.version)
        if canary is not None and weight > 0:
            canaries.append(
                {
                    "trafficPercent": weight,
                    "predictor": _canary_predictor(md, placement, canary, uri_of, image),
                }
            )
    predictor |= _replicas_and_scaling(serving)

    spec: dict[str, Any] = {"predictor": predictor}
    if canaries:
        spec["canary"] = canaries
    return {
        "apiVersion": KSERVE_API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": _labels(md),
            "annotations": _annotations(serving),
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": "ModelDeployment",
                    "name": name,
                    "uid": md.metadata.uid,
                    "controller": True,
                }
            ],
        },
        "spec": spec,
    }


def predictor_name(isvc_name: str, version: str) -> str:
    """The RawDeployment predictor name of ``version``: readable, deterministic, and short
    enough that KServe's Service ``<isvc>-<name>-predictor`` stays a DNS-1035 label."""
    budget = _SERVICE_NAME_MAX - len(isvc_name) - len("--predictor")
    if budget < 10:
        raise ValueError(
            f"metadata.name: {isvc_name!r} is {len(isvc_name)} characters; RawDeployment "
            f"canaries need it at most {_SERVICE_NAME_MAX - len('--predictor') - 10} so that "
            "KServe's per-version Service names fit in 63 characters"
        )
    label = version.lower()
    if not label[:1].isalpha():
        label = f"v{label}"
    return child_name(label, max_length=budget)


def cluster_storage_uri(uri: str, version: str = "") -> str:
    """``uri`` if a pod can fetch it through KServe's storage initializer, else ValueError."""
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if scheme in CLUSTER_SCHEMES:
        return uri
    whose = f" of ModelVersion {version}" if version else ""
    if scheme in ("", "file"):
        problem = "is a file on the operator's filesystem, which KServe's pods cannot read"
    else:
        problem = f"uses the scheme {scheme!r}, which KServe's storage initializer cannot fetch"
    raise ValueError(
        f"artifact URI {uri!r}{whose} {problem}: serving with KServe needs the artifact in "
        "object storage or a volume, s3://, gs:// or pvc:// (also https://, hdfs://, hf://, "
        "oci://); register the model there, or serve it with backend: local"
    )


def _predictor(
    md: ModelDeployment,
    placement: Placement,
    served: Served,
    uri_of: Callable[[Served], str],
    image: str,
) -> dict[str, Any]:
    serving = md.spec.serving
    predictor: dict[str, Any] = {
        "labels": {MODEL_VERSION_LABEL: served.version},
        "containers": [_container(md, placement, served, uri_of, image)],
    }
    resources = serving.resources
    if resources.node_selector:
        predictor["nodeSelector"] = dict(resources.node_selector)
    if resources.tolerations:
        predictor["tolerations"] = [_toleration(t) for t in resources.tolerations]
    return predictor


def _canary_predictor(
    md: ModelDeployment,
    placement: Placement,
    served: Served,
    uri_of: Callable[[Served], str],
    image: str,
) -> dict[str, Any]:
    """A ``spec.canary[].predictor``: named after its version, no autoscaling fields."""
    predictor = _predictor(md, placement, served, uri_of, image)
    predictor["name"] = predictor_name(md.metadata.name, served.version)
    if md.spec.serving.min_replicas == 0:
        # KServe derives a canary's replicas from the stable's minReplicas times its share;
        # a stable allowed to scale to zero would leave the canary with no pod to route to.
        predictor["minReplicas"] = 1
    return predictor


def _container(
    md: ModelDeployment,
    placement: Placement,
    served: Served,
    uri_of: Callable[[Served], str],
    image: str,
) -> dict[str, Any]:
    serving = md.spec.serving
    args = [
        "--model-dir",
        MODEL_DIR,
        "--model-name",
        md.metadata.name,
        "--model-version",
        served.version,
        "--http-port",
        str(HTTP_PORT),
    ]
    if serving.grpc:
        args += ["--grpc-port", str(GRPC_PORT)]
    args += runtime_options(serving, placement)
    ports: list[dict[str, Any]] = [{"name": "http1", "containerPort": HTTP_PORT, "protocol": "TCP"}]
    if serving.grpc and serving.deployment_mode == "RawDeployment":
        # Knative routes one port per container; a Deployment's Service can expose both.
        ports.append({"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"})
    storage_uri = cluster_storage_uri(uri_of(served), served.version)
    return {
        "name": CONTAINER_NAME,
        "image": image,
        "args": args,
        "env": [{"name": "STORAGE_URI", "value": storage_uri}],
        "ports": ports,
        "resources": _resources(serving.resources),
        "readinessProbe": {
            "httpGet": {"path": readiness_path(serving, md.metadata.name), "port": HTTP_PORT},
            "periodSeconds": 5,
        },
    }


def _resources(resources: ComputeResources) -> dict[str, dict[str, str]]:
    amounts = {"cpu": resources.cpu, "memory": resources.memory}
    if resources.gpu > 0:
        amounts[resources.gpu_resource] = str(resources.gpu)
    # requests == limits: a Guaranteed pod, and extended resources must be equal anyway.
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _toleration(toleration: Toleration) -> dict[str, Any]:
    out: dict[str, Any] = {"operator": toleration.operator}
    if toleration.key:
        out["key"] = toleration.key
    if toleration.value:
        out["value"] = toleration.value
    if toleration.effect:
        out["effect"] = toleration.effect
    if toleration.toleration_seconds is not None:
        out["tolerationSeconds"] = toleration.toleration_seconds
    return out


def _replicas_and_scaling(serving: Serving) -> dict[str, Any]:
    out: dict[str, Any] = {
        "minReplicas": serving.min_replicas,
        "maxReplicas": serving.max_replicas,
    }
    metric, target = serving.scale_metric, serving.scale_target
    if metric == "cpu":
        if target > 100:
            raise ValueError(
                f"spec.serving.scaleTarget: {target} is a CPU utilisation percentage with "
                "scaleMetric cpu; use 1..100"
            )
        out |= {"scaleMetric": "cpu", "scaleTarget": target}
    elif serving.deployment_mode == "Serverless":
        out |= {"scaleMetric": metric, "scaleTarget": target}
    return out


def _labels(md: ModelDeployment) -> dict[str, str]:
    labels = {MANAGED_BY: "kubeloop", MODEL_DEPLOYMENT_LABEL: md.metadata.name}
    queue = md.spec.serving.resources.queue_name
    if queue:
        labels[KUEUE_QUEUE_LABEL] = queue
    return labels


def _annotations(serving: Serving) -> dict[str, str]:
    annotations = {
        DEPLOYMENT_MODE: serving.deployment_mode,
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(HTTP_PORT),
        "prometheus.io/path": "/metrics",
    }
    if serving.deployment_mode == "Serverless" and serving.scale_metric == "cpu":
        annotations[KNATIVE_AUTOSCALER_CLASS] = KNATIVE_HPA_CLASS
    return annotations
