"""The validating admission webhook: what a schema cannot express, refused at ``kubectl apply``.

kopf serves the webhook (``@kopf.on.validate``), one handler per kind, each answering with the
refusals of ``handlers.refusals`` — the same the daemons find at reconcile — in one message that
names every field. An UPDATE that leaves the spec as it was passes untouched, so the operator's
own writes (finalizers, annotations) to a resource that was let in before the webhook existed
are never blocked; DELETE and status writes do not reach the webhook at all.

The server, its certificate and (on the local control plane) its registration are
``handlers.webhook_server``'s.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import kopf
import pydantic

from kubeloop import GROUP, VERSION
from kubeloop.api.base import Resource
from kubeloop.api.drift_policy import DriftPolicy
from kubeloop.api.model_deployment import ModelDeployment
from kubeloop.api.model_version import ModelVersion
from kubeloop.api.training_run import TrainingRun
from kubeloop.handlers import refusals
from kubeloop.handlers.errors import describe_validation_error
from kubeloop.handlers.startup import context
from kubeloop.planning import spec_rules
from kubeloop.planning.spec_rules import Refusal

R = TypeVar("R", bound=Resource)
CODE = 422  # as the API server answers a schema or CEL failure
ALL: list[Literal["CREATE", "UPDATE"]] = ["CREATE", "UPDATE"]


def _unchanged(body: kopf.Body, old: kopf.Body | None) -> bool:
    return old is not None and dict(body.get("spec") or {}) == dict(old.get("spec") or {})


def _parsed(cls: type[R], body: kopf.Body) -> R:
    try:
        return cls.parse(body)
    except pydantic.ValidationError as exc:
        raise kopf.AdmissionError(describe_validation_error(exc)[1], code=CODE) from exc


def _answer(found: list[Refusal]) -> None:
    if found:
        raise kopf.AdmissionError(spec_rules.message(found), code=CODE)


@kopf.on.validate(GROUP, VERSION, "trainingruns", id="validate-trainingrun", operations=ALL)
def validate_training_run(*, body: kopf.Body, memo: Any, **kwargs: Any) -> None:
    if not _unchanged(body, kwargs.get("old")):
        _answer(refusals.training_run(context(memo), _parsed(TrainingRun, body)))


@kopf.on.validate(GROUP, VERSION, "modelversions", id="validate-modelversion", operations=ALL)
def validate_model_version(*, body: kopf.Body, memo: Any, **kwargs: Any) -> None:
    if not _unchanged(body, kwargs.get("old")):
        _answer(refusals.model_version(context(memo), _parsed(ModelVersion, body)))


@kopf.on.validate(GROUP, VERSION, "modeldeployments", id="validate-modeldeployment", operations=ALL)
def validate_model_deployment(*, body: kopf.Body, **kwargs: Any) -> None:
    if not _unchanged(body, kwargs.get("old")):
        _answer(refusals.model_deployment(_parsed(ModelDeployment, body)))


@kopf.on.validate(GROUP, VERSION, "driftpolicies", id="validate-driftpolicy", operations=ALL)
async def validate_drift_policy(*, body: kopf.Body, memo: Any, **kwargs: Any) -> None:
    if not _unchanged(body, kwargs.get("old")):
        policy = _parsed(DriftPolicy, body)
        _answer(await refusals.drift_policy(context(memo), policy, served=True))
