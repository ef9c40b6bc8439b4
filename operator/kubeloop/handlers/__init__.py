"""kopf handlers: thin. Parse the body at the edge, observe, call planning, apply, write
status once. Importing this package registers every handler."""

from kubeloop.handlers import model_deployment, model_version, runtime, training_run

__all__ = ["model_deployment", "model_version", "runtime", "training_run"]
