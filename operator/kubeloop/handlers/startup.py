"""Operator start-up: kopf settings, and the context every handler shares (settings, the API
client, the backends, locks), kept in kopf's memo rather than in module globals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import kopf
import prometheus_client

from kubeloop.api.model_deployment import ModelDeployment
from kubeloop.backends.executor import Executor
from kubeloop.backends.kube import KubeClient, connection_info
from kubeloop.backends.prometheus import PrometheusClient
from kubeloop.backends.registry import Registry, VersionIndex
from kubeloop.backends.registry_index import RegistryIndexWriter
from kubeloop.backends.serving import ServingBackend
from kubeloop.backends.serving_kserve import KServeBackend
from kubeloop.backends.serving_local import LocalServingBackend
from kubeloop.handlers import kopf_patching, kopf_storage, webhook_server
from kubeloop.planning import naming, tenancy
from kubeloop.settings import Settings

FINALIZER = "kubeloop.dev/finalizer"


@dataclass
class Context:
    """What handlers share, kept in kopf's memo (no module-global clients)."""

    settings: Settings
    kube: KubeClient
    index_writer: RegistryIndexWriter
    prometheus: PrometheusClient
    serving: dict[str, ServingBackend]
    locks: defaultdict[tuple[str, ...], asyncio.Lock] = field(
        default_factory=lambda: defaultdict(asyncio.Lock)
    )
    executors: dict[str, Executor] = field(default_factory=dict)
    # GPUs of the TrainingRuns this operator admitted, by namespace and run (the admission
    # ledger: their Running status may not be visible in the API yet).
    admitted: defaultdict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))

    def executor(self, name: str) -> Executor:
        """The TrainingRun executor ``name`` (local or kfp), created on first use: the kfp
        client is only built when a run asks for it."""
        if name not in self.executors:
            if name == "kfp":
                from kubeloop.backends.executor_kfp import KfpExecutor

                self.executors[name] = KfpExecutor(
                    self.settings.kfp_host,
                    multi_user=self.settings.kfp_multi_user,
                    ssl_ca_cert=self.settings.kfp_ssl_ca_cert,
                )
            else:
                from kubeloop.backends.executor_local import LocalExecutor

                self.executors[name] = LocalExecutor(self.settings.state_dir)
        return self.executors[name]

    def lock(self, *key: str) -> asyncio.Lock:
        """A lock for what must be serial (e.g. allocating a model's next version number)."""
        return self.locks[key]

    def hold_gpus(self, namespace: str, run: str, gpus: int, running: bool) -> None:
        """Keep the admission ledger in step with the phase a TrainingRun is about to show."""
        if running:
            self.admitted[namespace][run] = gpus
        else:
            self.admitted[namespace].pop(run, None)

    def registry(self, index: VersionIndex) -> Registry:
        """The registry over the ModelVersion index a handler was given."""
        return Registry(self.kube, index, self.lock)

    def serving_backend(self, name: str) -> ServingBackend:
        """A ModelDeployment's serving backend (``default``: the operator's setting)."""
        return self.serving[self.settings.serving_backend if name == "default" else name]

    def request_log_uri(self, md: ModelDeployment) -> str:
        """Where a deployment's request log goes, under the tenant's prefix ('' for a remote
        server without an object store)."""
        cfg, backend = self.settings, md.spec.serving.backend
        return naming.request_log_uri(
            md.namespace,
            md.name,
            artifact_root=str(cfg.artifact_root),
            object_store_prefix=cfg.object_store_prefix,
            remote=(backend if backend != "default" else cfg.serving_backend) == "kserve",
        )

    @property
    def tenancy(self) -> tenancy.Policy:
        """Where tenants' data and artifacts may lie."""
        cfg = self.settings
        allow = {ns: tuple(prefixes) for ns, prefixes in cfg.data_allowlist.items()}
        return tenancy.Policy(str(cfg.artifact_root), cfg.object_store_prefix, allow)

    def executor_for(self, name: str) -> Executor:
        """A TrainingRun's executor (``default``: the operator's setting)."""
        return self.executor(self.settings.executor if name == "default" else name)


def context(memo: Any) -> Context:
    ctx: Context = memo["context"]
    return ctx


_STARTED_NS = time.time_ns()


def peering_priority(started_ns: int = _STARTED_NS) -> int:
    """Higher for an older process: minus its start time in microseconds (ties between two
    replicas started in the same microsecond would pause both; kopf says so in the log)."""
    return -(started_ns // 1000)


def configure_kopf(settings: kopf.OperatorSettings, cfg: Settings) -> None:
    kopf_patching.install()  # kopf's own patches retried on 409 (handlers/kopf_patching.py)
    settings.persistence.finalizer = FINALIZER
    # kopf's state in the status: one write per reconcile (handlers/kopf_storage.py).
    settings.persistence.progress_storage = kopf_storage.MigratingProgressStorage()
    settings.persistence.diffbase_storage = kopf_storage.MigratingDiffBaseStorage()
    settings.watching.server_timeout = cfg.watch_server_timeout
    settings.watching.client_timeout = cfg.watch_client_timeout
    # Our Events are explicit (kopf.event); only warnings from logs become Events.
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "kubeloop"
    settings.posting.reporting_instance = socket.gethostname()
    settings.peering.standalone = cfg.standalone
    if not cfg.standalone:
        # Mandatory: no peering object means no work, not two active replicas. The oldest
        # replica has the highest priority, so a new pod (a rolling update, a rescheduled
        # standby) waits until the active one leaves instead of taking over from it; kopf
        # pauses every replica that sees a peer of higher priority (and, to be safe, of equal).
        settings.peering.mandatory = True
        settings.peering.name = cfg.peering_name
        settings.peering.lifetime = cfg.peering_lifetime
        settings.peering.priority = peering_priority()
        settings.peering.stealth = True
    settings.networking.connect_timeout = 10
    # A worker per object lives this long after its last event (kopf's default, 5 s, keeps
    # hundreds alive through a burst of creations, each holding its object's last body).
    settings.queueing.idle_timeout = 1.0


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    """kopf's watches and our client authenticate the same way (service account, else
    kubeconfig), decided when the operator starts rather than when kopf was imported."""
    return connection_info()


@kopf.on.startup()
async def startup(
    settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    cfg = Settings()
    configure_kopf(settings, cfg)
    kube = KubeClient(connection_info(), field_manager=cfg.field_manager)
    serving: dict[str, ServingBackend] = {
        "local": LocalServingBackend(cfg.state_dir, cfg.scrape_targets_dir),
        "kserve": KServeBackend(kube, image=cfg.serving_image),
    }
    prometheus = PrometheusClient(cfg.prometheus_url, timeout=10)
    memo["context"] = Context(cfg, kube, RegistryIndexWriter(kube), prometheus, serving)
    tls = webhook_server.serve(settings, cfg)
    if tls is not None and cfg.webhook_register:
        memo["webhook_registration"] = asyncio.create_task(webhook_server.register(kube, cfg, tls))
    if tls is not None:
        logger.info("admission webhook on https://%s:%d", cfg.webhook_addr, cfg.webhook_port)
    if cfg.metrics_port:
        prometheus_client.start_http_server(cfg.metrics_port, addr="0.0.0.0")
        logger.info("operator metrics on :%d/metrics", cfg.metrics_port)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    ctx = memo.get("context")
    if isinstance(ctx, Context):
        registration = memo.get("webhook_registration")
        if registration is not None:
            registration.cancel()
            await webhook_server.unregister(ctx.kube, ctx.settings)
        # Index writes still waiting out their coalescing delay are made, not dropped (a
        # SIGKILLed operator's are redone by the next one's resume: each version reschedules).
        with contextlib.suppress(TimeoutError):  # the API may be what is gone
            await asyncio.wait_for(ctx.index_writer.close(), timeout=10)
        await ctx.kube.close()
