"""kopf handlers: thin. Parse the body at the edge, observe, plan once, apply once, write status
once (``daemon.py`` is the loop every daemon runs). Importing this package registers every
handler."""

from kubeloop.handlers import (
    admission,
    drift_policy,
    model_deployment,
    model_version,
    startup,
    training_run,
)

__all__ = [
    "admission",
    "drift_policy",
    "model_deployment",
    "model_version",
    "startup",
    "training_run",
]
