"""The admission webhook's server: kopf serves it with our certificate.

In the chart the webhook configuration, its Service and its certificate are the chart's (the
Secret is mounted at ``KUBELOOP_WEBHOOK_CERT_DIR``). On the local control plane the operator
makes a CA of its own under the state directory and registers the configuration with a URL to
itself (``KUBELOOP_WEBHOOK_REGISTER``), limited to the namespaces it watches, and removes it
when it stops (an operator killed outright leaves it; the next start replaces it).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import kopf

from kubeloop.backends.kube import WEBHOOK_CONFIGURATIONS, KubeClient
from kubeloop.backends.webhook_certs import TlsFiles, self_signed
from kubeloop.planning import webhook
from kubeloop.settings import Settings

LISTEN_TIMEOUT_S = 30


def tls_files(cfg: Settings) -> TlsFiles:
    """The chart's mounted certificate, or a self-signed one for the local control plane."""
    if cfg.webhook_cert_dir is not None:
        return TlsFiles.in_dir(cfg.webhook_cert_dir)
    return self_signed(cfg.state_dir / "webhook")


class NoWebhook:
    """What kopf serves the admission handlers with when no webhook is configured: nothing
    (kopf refuses to run admission handlers without a server)."""

    async def __call__(self, fn: Any) -> AsyncIterator[Any]:
        await asyncio.Event().wait()
        yield  # never reached: an async generator that yields no client config


def serve(settings: kopf.OperatorSettings, cfg: Settings) -> TlsFiles | None:
    """Point kopf's webhook server at our certificate (None: no webhook configured)."""
    if not cfg.webhook_port:
        settings.admission.server = NoWebhook()
        return None
    files = tls_files(cfg)
    settings.admission.server = kopf.WebhookServer(
        addr=cfg.webhook_addr,
        port=cfg.webhook_port,
        host="127.0.0.1" if cfg.webhook_register else None,
        certfile=str(files.cert),
        pkeyfile=str(files.key),
        cafile=str(files.ca),
    )
    settings.admission.managed = None  # the chart, or register() below, owns the configuration
    return files


def configuration_name(cfg: Settings) -> str:
    """One configuration per local operator: per watched namespace set."""
    if not cfg.namespaces:
        return "kubeloop-local"
    return f"kubeloop-local-{'-'.join(sorted(cfg.namespaces))}"[:253]


async def register(kube: KubeClient, cfg: Settings, files: TlsFiles) -> None:
    """Register the webhook with a URL to this process (the local control plane), once kopf's
    server accepts connections: registered earlier, a create in between would be refused for
    want of an answer."""
    deadline = asyncio.get_running_loop().time() + LISTEN_TIMEOUT_S
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", cfg.webhook_port)
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)
            continue
        writer.close()
        break
    body = webhook.configuration(
        configuration_name(cfg),
        url=f"https://127.0.0.1:{cfg.webhook_port}",
        ca_bundle=base64.b64encode(files.ca.read_bytes()).decode(),
        namespaces=list(cfg.namespaces),
        failure_policy=cfg.webhook_failure_policy,
    )
    await kube.apply(WEBHOOK_CONFIGURATIONS, None, body)


async def unregister(kube: KubeClient, cfg: Settings) -> None:
    await kube.delete(WEBHOOK_CONFIGURATIONS, None, configuration_name(cfg))
