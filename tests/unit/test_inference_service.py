"""The KServe InferenceService builder and status reader, without any server."""

from __future__ import annotations

from typing import Any

import pytest

from kubeloop.api.model_deployment import ModelDeployment
from kubeloop.backends.serving_kserve import serving_state
from kubeloop.planning.inference_service import (
    build_inference_service,
    cluster_storage_uri,
    predictor_name,
)
from kubeloop.planning.placement import Placement, Served

IMAGE = "ghcr.io/kubeloop/serving:test"
V1 = Served("churn-v1", "s3://models/ns/churn/v1")
V2 = Served("churn-v2", "s3://models/ns/churn/v2")


def md(name: str = "churn", **serving: Any) -> ModelDeployment:
    return ModelDeployment.model_validate(
        {
            "metadata": {"name": name, "namespace": "ns", "uid": "uid-1", "generation": 1},
            "spec": {"model": {"modelVersion": {"name": "churn-v1"}}, "serving": serving},
        }
    )


def build(deployment: ModelDeployment, placement: Placement) -> dict[str, Any]:
    return build_inference_service(deployment, placement, image=IMAGE)


def container(predictor: dict[str, Any]) -> dict[str, Any]:
    (only,) = predictor["containers"]
    return dict(only)


def arg(c: dict[str, Any], flag: str) -> str | None:
    args: list[str] = c["args"]
    return args[args.index(flag) + 1] if flag in args else None


def storage_uri(predictor: dict[str, Any]) -> str:
    return str(next(e["value"] for e in container(predictor)["env"] if e["name"] == "STORAGE_URI"))


# --- Serverless: the predictor carries the canary, KServe keeps the previous revision ---------


@pytest.mark.parametrize("weight", [10, 25, 50, 100])
def test_serverless_canary_carries_canary_version_and_percent(weight: int) -> None:
    isvc = build(md(deploymentMode="Serverless"), Placement(V1, V2, weight))
    predictor = isvc["spec"]["predictor"]
    assert predictor["canaryTrafficPercent"] == weight
    assert arg(container(predictor), "--model-version") == "churn-v2"
    assert storage_uri(predictor) == V2.uri
    assert "canary" not in isvc["spec"]
    assert "name" not in predictor
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"


def test_serverless_without_canary_is_stable_only() -> None:
    predictor = build(md(deploymentMode="Serverless"), Placement(V1))["spec"]["predictor"]
    assert "canaryTrafficPercent" not in predictor
    assert arg(container(predictor), "--model-version") == "churn-v1"
    assert storage_uri(predictor) == V1.uri


def test_serverless_weight_zero_is_kserves_rollback() -> None:
    predictor = build(md(deploymentMode="Serverless"), Placement(V1, V2, 0))["spec"]["predictor"]
    assert predictor["canaryTrafficPercent"] == 0  # the previous revision takes everything back


# --- RawDeployment: spec.canary, every predictor named after its version -----------------------


@pytest.mark.parametrize("weight", [10, 25, 50, 100])
def test_raw_canary_layout(weight: int) -> None:
    isvc = build(md(minReplicas=2, maxReplicas=4), Placement(V1, V2, weight))
    spec = isvc["spec"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    stable = spec["predictor"]
    assert "canaryTrafficPercent" not in stable
    assert stable["name"] == "churn-v1"
    assert arg(container(stable), "--model-version") == "churn-v1"
    assert (stable["minReplicas"], stable["maxReplicas"]) == (2, 4)
    (entry,) = spec["canary"]
    assert entry["trafficPercent"] == weight
    canary = entry["predictor"]
    assert canary["name"] == "churn-v2"
    assert arg(container(canary), "--model-version") == "churn-v2"
    assert storage_uri(canary) == V2.uri
    # KServe refuses autoscaling fields on a canary; its replicas follow its traffic share.
    assert not {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget"} & set(canary)


@pytest.mark.parametrize("placement", [Placement(V1, V2, 0), Placement(V1)])
def test_raw_rollback_is_stable_only(placement: Placement) -> None:
    spec = build(md(), placement)["spec"]
    assert "canary" not in spec
    assert spec["predictor"]["name"] == "churn-v1"


def test_raw_promotion_keeps_the_canary_predictor_name() -> None:
    during = build(md(), Placement(V1, V2, 100))["spec"]["canary"][0]["predictor"]["name"]
    after = build(md(), Placement(V2))["spec"]["predictor"]["name"]
    assert during == after == "churn-v2"  # KServe retargets the stable: no restart


def test_raw_canary_gets_a_pod_when_the_stable_may_scale_to_zero() -> None:
    spec = build(md(minReplicas=0, maxReplicas=3), Placement(V1, V2, 10))["spec"]
    assert spec["canary"][0]["predictor"]["minReplicas"] == 1


def test_predictor_names_fit_kserve_service_names() -> None:
    long_version = "churn-" + "x" * 57
    name = predictor_name("churn", long_version)
    assert len(f"churn-{name}-predictor") <= 63
    assert name == predictor_name("churn", long_version)  # deterministic
    assert name != predictor_name("churn", long_version[:-1] + "y")
    assert predictor_name("churn", "2024-01") == "v2024-01"
    with pytest.raises(ValueError, match=r"metadata\.name"):
        predictor_name("m" * 50, "v1")


def test_same_version_on_both_sides_is_no_canary() -> None:
    assert "canary" not in build(md(), Placement(V1, V1, 50))["spec"]


# --- resources, runtime arguments, metadata ----------------------------------------------------


def test_resources_gpu_and_placement() -> None:
    deployment = md(
        resources={
            "cpu": "2",
            "memory": "8Gi",
            "gpu": 1,
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
        }
    )
    predictor = build(deployment, Placement(V1))["spec"]["predictor"]
    resources = container(predictor)["resources"]
    expected = {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"}
    assert resources == {"requests": expected, "limits": expected}
    assert predictor["nodeSelector"] == {"pool": "gpu"}
    assert predictor["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]


def test_no_gpu_means_no_extended_resource() -> None:
    resources = container(build(md(), Placement(V1))["spec"]["predictor"])["resources"]
    assert resources["limits"] == {"cpu": "1", "memory": "2Gi"}


def test_other_accelerator_resource_names() -> None:
    deployment = md(resources={"gpu": 2, "gpuResource": "amd.com/gpu"})
    limits = container(build(deployment, Placement(V1))["spec"]["predictor"])["resources"]
    assert limits["limits"]["amd.com/gpu"] == "2"


def test_runtime_arguments() -> None:
    plain = container(build(md(), Placement(V1))["spec"]["predictor"])
    assert plain["image"] == IMAGE
    assert plain["name"] == "kserve-container"
    assert plain["args"] == [
        "--model-dir",
        "/mnt/models",
        "--model-name",
        "churn",
        "--model-version",
        "churn-v1",
        "--http-port",
        "8080",
        "--feedback-ttl",
        "3600.0",
    ]
    full = container(
        build(
            md(
                grpc=True,
                batching={"enabled": True, "maxBatchSize": 64, "maxLatencyMs": 20},
                cache={"enabled": True, "maxEntries": 500, "ttlSeconds": 60},
            ),
            Placement(V1),
        )["spec"]["predictor"]
    )
    assert arg(full, "--grpc-port") == "8081"
    assert (arg(full, "--max-batch-size"), arg(full, "--max-latency-ms")) == ("64", "20")
    assert (arg(full, "--cache-size"), arg(full, "--cache-ttl")) == ("500", "60")
    assert [p["containerPort"] for p in full["ports"]] == [8080, 8081]


def test_monitoring_device_and_shared_edges_reach_the_runtime() -> None:
    placement = Placement(
        V1, request_log_uri="s3://b/p/ns/serving/churn/requests", prediction_edges=(0.0, 2.5, 9.0)
    )
    deployment = md(
        resources={"gpu": 1},
        monitoring={
            "requestLog": {"sampleRate": 0.25, "maxRows": 5000, "flushInterval": "5s"},
            "feedbackTtl": "10m",
        },
    )
    c = container(build(deployment, placement)["spec"]["predictor"])
    assert arg(c, "--device") == "cuda"
    assert arg(c, "--feedback-ttl") == "600.0"
    assert arg(c, "--request-log-uri") == "s3://b/p/ns/serving/churn/requests"
    assert (arg(c, "--request-log-sample"), arg(c, "--request-log-max-rows")) == ("0.25", "5000")
    assert arg(c, "--request-log-flush-interval") == "5.0"
    assert arg(c, "--prediction-edges") == "[0.0, 2.5, 9.0]"
    off = md(monitoring={"requestLog": {"enabled": False}})
    args = container(build(off, placement)["spec"]["predictor"])["args"]
    assert "--request-log-uri" not in args
    assert "--device" not in args


def test_the_protocol_names_the_readiness_route() -> None:
    v2 = container(build(md(), Placement(V1))["spec"]["predictor"])
    assert v2["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    v1 = container(build(md(protocol="v1"), Placement(V1))["spec"]["predictor"])
    assert v1["readinessProbe"]["httpGet"]["path"] == "/v1/models/churn"


def test_batching_and_cache_flags_absent_when_disabled() -> None:
    args = container(build(md(), Placement(V1))["spec"]["predictor"])["args"]
    assert not {"--max-batch-size", "--cache-size", "--grpc-port"} & set(args)


def test_labels_annotations_and_owner() -> None:
    isvc = build(md(resources={"queueName": "team-a"}), Placement(V1))
    meta = isvc["metadata"]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc["kind"] == "InferenceService"
    assert (meta["name"], meta["namespace"]) == ("churn", "ns")
    assert meta["labels"] == {
        "app.kubernetes.io/managed-by": "kubeloop",
        "kubeloop.dev/model-deployment": "churn",
        "kueue.x-k8s.io/queue-name": "team-a",
    }
    assert meta["annotations"] == {
        "serving.kserve.io/deploymentMode": "RawDeployment",
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "8080",
        "prometheus.io/path": "/metrics",
    }
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "kubeloop.dev/v1alpha1",
            "kind": "ModelDeployment",
            "name": "churn",
            "uid": "uid-1",
            "controller": True,
        }
    ]
    assert isvc["spec"]["predictor"]["labels"] == {"kubeloop.dev/model-version": "churn-v1"}


def test_no_queue_label_without_a_queue() -> None:
    assert "kueue.x-k8s.io/queue-name" not in build(md(), Placement(V1))["metadata"]["labels"]


def test_missing_uid_is_refused() -> None:
    deployment = md()
    deployment.metadata.uid = ""
    with pytest.raises(ValueError, match=r"metadata\.uid"):
        build(deployment, Placement(V1))


# --- autoscaling --------------------------------------------------------------------------------


def test_serverless_scales_on_concurrency() -> None:
    isvc = build(md(deploymentMode="Serverless", scaleTarget=16), Placement(V1))
    predictor = isvc["spec"]["predictor"]
    assert (predictor["scaleMetric"], predictor["scaleTarget"]) == ("concurrency", 16)
    assert "autoscaling.knative.dev/class" not in isvc["metadata"]["annotations"]


def test_serverless_cpu_uses_knatives_hpa_class() -> None:
    isvc = build(md(deploymentMode="Serverless", scaleMetric="cpu", scaleTarget=70), Placement(V1))
    annotations = isvc["metadata"]["annotations"]
    assert annotations["autoscaling.knative.dev/class"] == "hpa.autoscaling.knative.dev"
    assert isvc["spec"]["predictor"]["scaleMetric"] == "cpu"


def test_raw_leaves_concurrency_to_keda_and_scales_on_cpu() -> None:
    predictor = build(md(), Placement(V1))["spec"]["predictor"]
    assert "scaleMetric" not in predictor  # a Kubernetes HPA cannot scale on concurrency
    cpu = build(md(scaleMetric="cpu", scaleTarget=60), Placement(V1))["spec"]["predictor"]
    assert (cpu["scaleMetric"], cpu["scaleTarget"]) == ("cpu", 60)


def test_cpu_target_over_100_is_refused() -> None:
    with pytest.raises(ValueError, match=r"scaleTarget: 200"):
        build(md(scaleMetric="cpu", scaleTarget=200), Placement(V1))


# --- artifact URIs -------------------------------------------------------------------------------


@pytest.mark.parametrize("uri", ["file:///tmp/kubeloop/artifacts/ns/churn/v1", "/data/churn/v1"])
def test_local_file_artifacts_are_refused(uri: str) -> None:
    with pytest.raises(ValueError, match="KServe's pods cannot read") as info:
        build(md(), Placement(Served("churn-v1", uri)))
    message = str(info.value)
    assert uri in message
    assert "churn-v1" in message
    assert "s3://, gs:// or pvc://" in message
    assert "KServe" in message


def test_unknown_schemes_are_refused() -> None:
    with pytest.raises(ValueError, match="'ftp'"):
        cluster_storage_uri("ftp://host/model")


@pytest.mark.parametrize("uri", ["s3://b/p", "gs://b/p", "pvc://claim/p", "https://h/m.tgz"])
def test_cluster_schemes_pass(uri: str) -> None:
    assert cluster_storage_uri(uri) == uri


def test_storage_uri_of_maps_the_artifact() -> None:
    isvc = build_inference_service(
        md(),
        Placement(Served("churn-v1", "file:///tmp/a/ns/churn/v1")),
        image=IMAGE,
        storage_uri_of=lambda s: f"pvc://artifacts/ns/churn/{s.version}",
    )
    assert storage_uri(isvc["spec"]["predictor"]) == "pvc://artifacts/ns/churn/churn-v1"


def test_file_uri_from_storage_uri_of_is_still_refused() -> None:
    with pytest.raises(ValueError, match="file:///x"):
        build_inference_service(
            md(), Placement(V1), image=IMAGE, storage_uri_of=lambda _: "file:///x"
        )


# --- reading KServe's status ------------------------------------------------------------------


def isvc_status(generation: int = 1, **status: Any) -> dict[str, Any]:
    return {"metadata": {"generation": generation}, "status": {"observedGeneration": 1, **status}}


def ready(status: str = "True", **extra: str) -> dict[str, str]:
    return {"type": "Ready", "status": status, **extra}


def test_state_waits_for_the_current_generation() -> None:
    state = serving_state(isvc_status(generation=2, conditions=[ready()]), md(), Placement(V1))
    assert not state.stable_ready
    assert "generation 2" in state.message


def test_state_ready_with_url() -> None:
    body = isvc_status(conditions=[ready()], url="http://churn.ns.example.com")
    state = serving_state(body, md(), Placement(V1))
    assert (state.stable_ready, state.canary_ready) == (True, False)
    assert state.url == "http://churn.ns.example.com"
    assert state.message == ""


def test_state_not_ready_reports_the_condition() -> None:
    body = isvc_status(conditions=[ready("False", reason="RevisionFailed", message="OOMKilled")])
    state = serving_state(body, md(), Placement(V1))
    assert not state.stable_ready
    assert state.message == "RevisionFailed: OOMKilled"


def test_state_raw_canary_from_canary_statuses() -> None:
    conditions = [ready(), {"type": "PredictorReady", "status": "True"}]
    pending = isvc_status(
        conditions=conditions,
        canaryStatuses=[{"name": "churn-v2", "ready": False, "trafficPercent": 10}],
    )
    state = serving_state(pending, md(), Placement(V1, V2, 10))
    assert (state.stable_ready, state.canary_ready) == (True, False)
    assert "churn-v2" in state.message
    done = isvc_status(
        conditions=conditions,
        canaryStatuses=[{"name": "churn-v2", "ready": True, "trafficPercent": 10}],
    )
    assert serving_state(done, md(), Placement(V1, V2, 10)).canary_ready


def test_state_serverless_canary_from_revisions() -> None:
    deployment = md(deploymentMode="Serverless")
    traffic = [
        {"revisionName": "churn-predictor-00002", "latestRevision": True, "percent": 10},
        {"revisionName": "churn-predictor-00001", "tag": "prev", "percent": 90},
    ]
    creating = isvc_status(
        conditions=[ready("False", reason="RevisionMissing")],
        components={
            "predictor": {
                "latestCreatedRevision": "churn-predictor-00002",
                "latestReadyRevision": "churn-predictor-00001",
                "traffic": traffic,
            }
        },
    )
    state = serving_state(creating, deployment, Placement(V1, V2, 10))
    assert (state.stable_ready, state.canary_ready) == (True, False)
    serving = isvc_status(
        conditions=[ready()],
        components={
            "predictor": {
                "latestCreatedRevision": "churn-predictor-00002",
                "latestReadyRevision": "churn-predictor-00002",
                "traffic": traffic,
            }
        },
    )
    state = serving_state(serving, deployment, Placement(V1, V2, 10))
    assert (state.stable_ready, state.canary_ready) == (True, True)
