"""Operator settings, read from KUBELOOP_* environment variables (Helm sets them)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from kubeloop.api.model_version import Alias


def _cache() -> Path:
    return Path.home() / ".cache" / "kubeloop"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KUBELOOP_", env_nested_delimiter="__")

    namespaces: list[str] = Field(
        default_factory=list, description="Namespaces to watch; empty watches the cluster."
    )
    executor: Literal["local", "kfp"] = Field(
        default="local", description="Default TrainingRun executor."
    )
    serving_backend: Literal["local", "kserve"] = Field(
        default="local", description="Default ModelDeployment backend."
    )
    promote_alias: Alias = Field(
        default="production",
        description="Alias a promoted version claims, unless spec.rollout.promoteAlias says.",
    )
    artifact_root: Path = Field(
        default_factory=lambda: Path("/tmp/kubeloop/artifacts"),
        description="Root of file:// artifacts; each tenant owns <root>/<namespace>/.",
    )
    object_store_prefix: str = Field(
        default="",
        description="If set (s3://bucket/prefix/), s3:// and gs:// artifacts must "
        "lie under <prefix><namespace>/.",
    )
    data_allowlist: dict[str, list[str]] = Field(
        default_factory=dict,
        description="More prefixes a namespace's training data may come from, as JSON "
        '{"<namespace>": ["s3://shared/datasets/"], "*": [...]} ("*": every namespace); '
        "each namespace always reads its own artifact and object-store prefix.",
    )
    webhook_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of the validating admission webhook (HTTPS); 0 serves none.",
    )
    webhook_addr: str = Field(default="0.0.0.0", description="Address the webhook listens on.")
    webhook_cert_dir: Path | None = Field(
        default=None,
        description="Directory with tls.crt, tls.key and ca.crt (the chart mounts its Secret); "
        "unset: a self-signed CA and certificate for 127.0.0.1 under <stateDir>/webhook.",
    )
    webhook_register: bool = Field(
        default=False,
        description="Register the webhook's ValidatingWebhookConfiguration at start-up, with a "
        "URL to this process (the local control plane; the chart ships its own).",
    )
    webhook_failure_policy: Literal["Fail", "Ignore"] = Field(
        default="Fail", description="failurePolicy of a registered webhook."
    )
    verify_local_artifacts: bool = Field(
        default=True,
        description="Check that file:// artifacts exist and match their digest "
        "(the operator must see the same filesystem, as in local mode).",
    )
    training_image: str = Field(
        default="ghcr.io/kubeloop/training:0.1.0",
        description="Image of the pipeline components (images/training).",
    )
    kfp_host: str = Field(
        default="http://ml-pipeline-ui.kubeflow:80",
        description="Kubeflow Pipelines API for the kfp executor.",
    )
    kfp_multi_user: bool = Field(
        default=False,
        description="Kubeflow's multi-user mode: experiments and runs live in the tenant's "
        "namespace (the pipelines token comes from KF_PIPELINES_SA_TOKEN_PATH in-cluster).",
    )
    kfp_ssl_ca_cert: str | None = Field(
        default=None, description="CA bundle for an https Kubeflow Pipelines API."
    )
    kueue_queue: str = Field(
        default="",
        description="Kueue LocalQueue name set as kueue.x-k8s.io/queue-name on pipeline pods.",
    )
    gpu_budget: int | None = Field(
        default=None,
        ge=0,
        description="GPUs the TrainingRuns of one namespace may hold at once; a "
        "ResourceQuota on requests.<gpu resource> in the namespace also limits it.",
    )
    serving_image: str = Field(
        default="ghcr.io/kubeloop/serving:0.1.0",
        description="Image of the model-serving runtime (images/serving) for KServe.",
    )
    prometheus_url: str = Field(
        default="http://127.0.0.1:9090", description="Prometheus the analyses query."
    )
    scrape_targets_dir: Path = Field(
        default_factory=lambda: _cache() / "prometheus" / "targets",
        description="file_sd_configs directory where local model servers are registered.",
    )
    state_dir: Path = Field(
        default_factory=lambda: _cache() / "state", description="Local executor and server state."
    )
    field_manager: str = Field(default="kubeloop", description="Server-side apply manager.")
    metrics_port: int = Field(
        default=8080, ge=0, le=65535, description="Port of the operator's own /metrics; 0 disables."
    )
    watch_server_timeout: int = Field(
        default=300, ge=1, description="Server-side watch timeout (seconds)."
    )
    watch_client_timeout: int = Field(
        default=330, ge=1, description="Client-side watch timeout (seconds)."
    )
    backoff_base: float = Field(default=2.0, gt=0, description="First retry delay (seconds).")
    backoff_max: float = Field(default=120.0, gt=0, description="Longest retry delay (seconds).")
    standalone: bool = Field(
        default=True,
        description="No kopf peering (one replica). false: replicas peer through the kopf "
        "peering object and only the oldest live one reconciles (the chart's setting).",
    )
    peering_name: str = Field(
        default="kubeloop",
        min_length=1,
        max_length=63,
        description="Name of the KopfPeering (namespaced mode) or ClusterKopfPeering object the "
        "replicas share; it must exist (the chart creates it).",
    )
    peering_lifetime: int = Field(
        default=15,
        ge=2,
        le=300,
        description="Seconds a replica's keep-alive counts; a killed active replica is replaced "
        "by a standby within about this long.",
    )
