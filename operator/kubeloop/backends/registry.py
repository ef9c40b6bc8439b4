"""The registry as the other kinds see it: reads from the kopf index of ModelVersions (kept
current by the watch stream, so no LIST per pass), and the one write they need — create the
next version of a model.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import kopf

from kubeloop.api.model_version import ModelVersion
from kubeloop.api.training_run import TrainingRun, TrainingRunStatus
from kubeloop.backends.executor import ExecutorError
from kubeloop.backends.kube import MODEL_VERSIONS, ApiError, KubeClient, NotFound
from kubeloop.backends.run_store import RunStore
from kubeloop.contract.labels import ATTEMPT_LABEL, TRAINING_RUN_LABEL
from kubeloop.contract.steps import MANIFEST_FILE
from kubeloop.planning import registry as rules

ModelKey = tuple[str, str]  # (namespace, model name)
VersionIndex = Mapping[ModelKey, Iterable[ModelVersion]]
ALLOCATION_ATTEMPTS = 5


def index_versions(body: Mapping[str, Any]) -> dict[ModelKey, ModelVersion]:
    """The kopf index function: every version under (namespace, model name). A body that is
    not a valid ModelVersion is left out (its own handler reports it)."""
    status = body.get("status") or {}
    if "kopf" in status:  # kopf's copy of the spec it handled: nothing the registry reads
        body = {**body, "status": {k: v for k, v in status.items() if k != "kopf"}}
    try:
        mv = ModelVersion.parse(body)
    except ValueError:
        return {}
    return {(mv.namespace, mv.spec.model_name): mv}


class Registry:
    """One namespace's view of the registry, over the operator's index."""

    def __init__(
        self,
        kube: KubeClient,
        index: VersionIndex | kopf.Index[ModelKey, ModelVersion],
        lock: Callable[..., asyncio.Lock],
    ) -> None:
        self._kube = kube
        self._index = index
        self._lock = lock

    def versions(self, namespace: str, model: str | None = None) -> list[ModelVersion]:
        """The versions of ``model`` in ``namespace`` (of every model when None)."""
        if model is not None:
            return list(self._index.get((namespace, model), ()))
        return [v for (ns, _), found in self._index.items() if ns == namespace for v in found]

    def get(self, namespace: str, name: str) -> ModelVersion | None:
        return next((v for v in self.versions(namespace) if v.name == name), None)

    async def registered_by(self, namespace: str, training_run: str, attempt: int) -> str:
        """The version an attempt registered ('' if none). The index first; a labelled LIST
        when the index does not know one yet (it may lag a create by a watch event), so a
        registration is never repeated."""
        found = rules.registered_by(self.versions(namespace), training_run, attempt)
        if found:
            return found[0].name
        selector = f"{TRAINING_RUN_LABEL}={training_run},{ATTEMPT_LABEL}={attempt}"
        listed = await self._kube.list(MODEL_VERSIONS, namespace, label_selector=selector)
        return str(listed[0]["metadata"]["name"]) if listed else ""

    async def create_next_version(
        self, namespace: str, model: str, build: Callable[[int], dict[str, Any]]
    ) -> str:
        """Create ``build(n)`` for the next free version number ``n`` of ``model``. Version
        numbers are allocated one at a time per model in this operator; a number another
        writer took meanwhile answers 409 and the next one is tried."""
        async with self._lock("registry", namespace, model):
            version = rules.next_version(v.spec.version for v in self.versions(namespace, model))
            for _ in range(ALLOCATION_ATTEMPTS):
                body = build(version)
                try:
                    await self._kube.create(MODEL_VERSIONS, namespace, body)
                except ApiError as exc:
                    if exc.status == 409:
                        version = rules.next_version((), after=version)
                        continue
                    raise
                return str(body["metadata"]["name"])
        raise ApiError(409, "Conflict", f"no free version number for model {model!r} yet")

    async def register_attempt(
        self, tr: TrainingRun, status: TrainingRunStatus, run_uri: str
    ) -> None:
        """Create the ModelVersion an attempt's register step described in its manifest, as the
        next version of the model. The caller has just seen (``registered_by``, in the same
        pass) that the attempt registered nothing yet."""
        manifest = await asyncio.to_thread(RunStore(run_uri).read_json, MANIFEST_FILE)
        if manifest is None:
            raise ExecutorError(f"{run_uri}/{MANIFEST_FILE} is missing or unreadable", False)
        model = tr.spec.registration.model_name
        await self.create_next_version(
            tr.namespace,
            model,
            lambda version: rules.build_registered_version(
                manifest,
                model=model,
                version=version,
                namespace=tr.namespace,
                training_run=tr.name,
                attempt=status.attempt,
                run_id=status.run_id,
                spec_hash=status.spec_hash,
                labels=tr.spec.registration.labels,
                parent_version=tr.spec.registration.parent_version,
            ),
        )

    async def claim_alias(self, namespace: str, name: str, alias: str) -> None:
        """Add ``alias`` to a version's spec (the ModelVersion handler moves it from the
        previous holder)."""
        try:
            mv = ModelVersion.parse(await self._kube.get(MODEL_VERSIONS, namespace, name))
        except NotFound:
            return
        if alias in mv.spec.aliases:
            return
        await self._kube.patch(
            MODEL_VERSIONS, namespace, name, {"spec": {"aliases": [*mv.spec.aliases, alias]}}
        )
