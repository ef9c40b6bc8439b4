"""Looking at artifacts: existence and digest of file:// paths, PVCs for pvc:// URIs."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from kubeloop.backends.kube import PVCS, KubeClient, NotFound
from kubeloop.planning.model_version import ArtifactObservation


def digest(path: Path) -> str:
    """sha256 of a file; for a directory, of every file's relative path and digest."""
    if path.is_file():
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    h = hashlib.sha256()
    for child in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{child.relative_to(path).as_posix()}\0{digest(child)}\n".encode())
    return h.hexdigest()


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
