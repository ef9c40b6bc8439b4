"""Serve ModelDeployments as KServe InferenceServices.

``apply`` server-side-applies the InferenceService built by
``planning/inference_service.py`` (one per ModelDeployment, same name, owned by it) and reads
KServe's status back from the object the API server returns; ``delete`` removes it. ``ApiError``
passes through unchanged: the operator's error adapter (``handlers/errors.py``) decides between
retry and failure.

Reading KServe's status (``status`` of ``serving.kserve.io/v1beta1``):

- Nothing counts until KServe has seen the current spec: ``status.observedGeneration`` must
  reach ``metadata.generation`` (a step we just applied is not ready because the previous one was).
- ``conditions``: ``Ready`` (everything), ``PredictorReady`` (the stable predictor).
- Serverless: with a canary, ``Ready`` follows the newest revision (the canary), and the stable
  side is the previous rolled-out revision, which KServe lists in
  ``components.predictor.traffic`` with ``tag: prev`` / ``latestRevision: false``.
- RawDeployment (``spec.canary``): ``canaryStatuses[] {name, ready, trafficPercent}`` per canary
  predictor name; ``PredictorReady`` for the stable Deployment.
"""

from __future__ import annotations

from typing import Any

from kubeloop.api.model_deployment import ModelDeployment
from kubeloop.backends.kube import Body, Kind, KubeClient, NotFound
from kubeloop.planning.inference_service import build_inference_service, predictor_name
from kubeloop.planning.placement import Placement, ServingState

INFERENCE_SERVICES = Kind("serving.kserve.io", "v1beta1", "inferenceservices")


class KServeBackend:
    """A ServingBackend that drives KServe through our own async client."""

    def __init__(self, kube: KubeClient, *, image: str) -> None:
        self.kube = kube
        self.image = image

    async def observe(self, md: ModelDeployment, placement: Placement) -> ServingState:
        try:
            isvc = await self.kube.get(INFERENCE_SERVICES, md.metadata.namespace, md.name)
        except NotFound:
            return ServingState(stable_ready=False, canary_ready=False)
        return serving_state(isvc, md, placement)

    async def apply(self, md: ModelDeployment, placement: Placement) -> ServingState:
        body = build_inference_service(md, placement, image=self.image)
        applied = await self.kube.apply(INFERENCE_SERVICES, md.metadata.namespace, body)
        return serving_state(applied, md, placement)

    async def delete(self, md: ModelDeployment) -> None:
        await self.kube.delete(INFERENCE_SERVICES, md.metadata.namespace, md.metadata.name)


def serving_state(isvc: Body, md: ModelDeployment, placement: Placement) -> ServingState:
    """What KServe reports about ``isvc`` for ``placement`` (see the module docstring)."""
    status: dict[str, Any] = isvc.get("status") or {}
    generation = int((isvc.get("metadata") or {}).get("generation", 0))
    observed = int(status.get("observedGeneration", 0) or 0)
    url = str(status.get("url") or (status.get("address") or {}).get("url") or "")
    if observed < generation:
        return ServingState(
            stable_ready=False,
            canary_ready=False,
            url=url,
            message=f"waiting for KServe to observe generation {generation} (saw {observed})",
        )

    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    ready = _true(conditions.get("Ready"))
    predictor_ready = (
        _true(conditions["PredictorReady"]) if "PredictorReady" in conditions else ready
    )
    canary = placement.canary
    if canary is not None and canary.version == placement.stable.version:
        canary = None
    mode = md.spec.serving.deployment_mode

    if canary is None:
        stable_ready, canary_ready = ready, False
    elif mode == "Serverless":
        component = (status.get("components") or {}).get("predictor") or {}
        created = component.get("latestCreatedRevision")
        newest_ready = component.get("latestReadyRevision")
        canary_ready = ready and (created is None or created == newest_ready)
        previous = [
            t
            for t in component.get("traffic") or []
            if t.get("tag") == "prev" or t.get("latestRevision") is False
        ]
        stable_ready = ready or bool(previous)
    else:
        wanted = predictor_name(md.metadata.name, canary.version)
        entries = [c for c in status.get("canaryStatuses") or [] if c.get("name") == wanted]
        stable_ready = predictor_ready
        if placement.canary_weight == 0:
            canary_ready = False  # no canary entry is applied at weight 0
        elif entries:
            canary_ready = bool(entries[0].get("ready"))
        else:
            canary_ready = False

    message = ""
    ready_condition = conditions.get("Ready")
    if ready_condition is not None and not _true(ready_condition):
        reason = ready_condition.get("reason") or ready_condition.get("status", "Unknown")
        message = f"{reason}: {ready_condition.get('message', '')}".rstrip(": ")
    elif ready_condition is None:
        message = "KServe has not reported a Ready condition yet"
    elif canary is not None and placement.canary_weight > 0 and not canary_ready:
        message = f"canary {canary.version} is not ready yet"
    return ServingState(
        stable_ready=stable_ready, canary_ready=canary_ready, url=url, message=message
    )


def _true(condition: dict[str, Any] | None) -> bool:
    return condition is not None and condition.get("status") == "True"
