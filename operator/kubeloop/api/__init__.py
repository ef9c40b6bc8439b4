"""The kubeloop.dev/v1alpha1 API: pydantic models that generate the CRDs."""

from kubeloop.api.base import Condition, Resource
from kubeloop.api.drift_policy import DriftPolicy
from kubeloop.api.model_deployment import ModelDeployment
from kubeloop.api.model_version import ModelVersion
from kubeloop.api.training_run import TrainingRun

KINDS: tuple[type[Resource], ...] = (TrainingRun, ModelVersion, ModelDeployment, DriftPolicy)

__all__ = [
    "KINDS",
    "Condition",
    "DriftPolicy",
    "ModelDeployment",
    "ModelVersion",
    "Resource",
    "TrainingRun",
]
