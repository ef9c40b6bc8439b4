"""Looking at artifacts: existence and digest of file:// paths, PVCs for pvc:// URIs."""

from __future__ import annotations

import asyncio
from pathlib import Path

from kubeloop.backends.kube import PVCS, KubeClient, NotFound
from kubeloop.contract.artifact import digest
from kubeloop.planning.model_version import ArtifactObservation


def _observe_file(path: Path) -> ArtifactObservation:
    if not path.exists():
        return ArtifactObservation(exists=False, detail=f"{path} does not exist")
    return ArtifactObservation(exists=True, sha256=digest(path))


async def observe(
    uri: str, namespace: str, kube: KubeClient, *, verify_local: bool
) -> ArtifactObservation:
    if uri.startswith("file://"):
        if not verify_local:
            return ArtifactObservation()
        return await asyncio.to_thread(_observe_file, Path(uri.removeprefix("file://")))
    if uri.startswith("pvc://"):
        claim = uri.removeprefix("pvc://").split("/", 1)[0]
        try:
            await kube.get(PVCS, namespace, claim)
        except NotFound:
            return ArtifactObservation(
                exists=False,
                detail=f"PersistentVolumeClaim {claim!r} not found in namespace {namespace!r}",
            )
        return ArtifactObservation()  # the claim exists; its files are not visible from here
    return ArtifactObservation()  # object stores: checked by whoever loads the model
