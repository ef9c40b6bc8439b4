"""The ValidatingWebhookConfiguration of kubeloop's admission webhook. Pure.

One webhook per kind, on CREATE and UPDATE of the main resource only (status writes and
deletes never pass through it). ``failurePolicy: Fail`` is the default: the operator checks the
same rules again at reconcile, so ``Ignore`` would still refuse a bad spec, only later and as a
``Ready=False`` condition; ``Fail`` refuses it at ``kubectl apply``. The price is that while no
webhook replica answers, kubeloop resources cannot be created or changed (deletes and every
other resource are unaffected); clusters that prefer availability set ``Ignore``.
"""

from __future__ import annotations

from typing import Any, Literal

from kubeloop import GROUP, VERSION

# (plural, handler id): the id is also the URL path the webhook is served at.
WEBHOOKS = (
    ("trainingruns", "validate-trainingrun"),
    ("modelversions", "validate-modelversion"),
    ("modeldeployments", "validate-modeldeployment"),
    ("driftpolicies", "validate-driftpolicy"),
)
TIMEOUT_S = 10


def configuration(
    name: str,
    *,
    url: str,
    ca_bundle: str,
    namespaces: list[str],
    failure_policy: Literal["Fail", "Ignore"] = "Fail",
) -> dict[str, Any]:
    """The configuration for a webhook served at ``url`` (``ca_bundle``: base64 PEM),
    limited to ``namespaces`` when any are given."""
    selector: dict[str, Any] = {}
    if namespaces:
        selector = {
            "matchExpressions": [
                {
                    "key": "kubernetes.io/metadata.name",
                    "operator": "In",
                    "values": sorted(namespaces),
                }
            ]
        }
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "kubeloop"}},
        "webhooks": [
            {
                "name": f"{handler}.{GROUP}",
                "clientConfig": {"url": f"{url.rstrip('/')}/{handler}", "caBundle": ca_bundle},
                "rules": [
                    {
                        "apiGroups": [GROUP],
                        "apiVersions": [VERSION],
                        "resources": [plural],
                        "operations": ["CREATE", "UPDATE"],
                        "scope": "Namespaced",
                    }
                ],
                "namespaceSelector": selector,
                "failurePolicy": failure_policy,
                "sideEffects": "None",
                "matchPolicy": "Equivalent",
                "admissionReviewVersions": ["v1"],
                "timeoutSeconds": TIMEOUT_S,
            }
            for plural, handler in WEBHOOKS
        ],
    }
