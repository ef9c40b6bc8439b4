"""kopf handlers: thin. Parse the body at the edge, observe, plan once, apply once, write status
once (``daemon.py`` is the loop every daemon runs). Importing this package registers every
handler."""

from kubeloop.handlers import (
    drift_policy,
    kopf_storage,
    model_deployment,
    model_version,
    startup,
    training_run,
    webhook,
)

__all__ = [
    "drift_policy",
    "kopf_storage",
    "model_deployment",
    "model_version",
    "startup",
    "training_run",
    "webhook",
]
