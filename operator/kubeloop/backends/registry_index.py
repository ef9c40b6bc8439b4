"""The per-model index ConfigMap, written in the background and coalesced.

Registering a burst of versions (a tuning sweep, a bulk import) changes one model's index many
times within milliseconds; writing it once per burst instead of once per version keeps the
operator's API traffic close to one status write per version. An index this process wrote is
not written again while it says the same. After a restart each model's index is applied once
(the operator may not read ConfigMaps: tenants keep their own configuration in them); an apply
that changes nothing is no write to etcd and no watch event.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

from kubeloop.backends.kube import CONFIGMAPS, ApiError, KubeClient
from kubeloop.backends.registry import VersionIndex
from kubeloop.planning.model_version import VersionEntry, build_registry_index

log = logging.getLogger("kubeloop.registry")


class RegistryIndexWriter:
    def __init__(self, kube: KubeClient, *, delay: float = 1.0, attempts: int = 5) -> None:
        self._kube = kube
        self._delay = delay
        self._attempts = attempts
        self._pending: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._written: dict[tuple[str, str], tuple[Any, ...]] = {}  # what each index says
        self._closed = False

    def schedule(self, namespace: str, model: str, index: VersionIndex) -> None:
        """Write the index of ``model`` soon, from the versions ``index`` holds then; calls
        within the delay coalesce into one write."""
        key = (namespace, model)
        if self._closed:  # shutting down: the next operator's resume writes it
            return
        if key not in self._pending:
            self._pending[key] = asyncio.create_task(self._write_later(key, index))

    async def _write_later(self, key: tuple[str, str], index: VersionIndex) -> None:
        namespace, model = key
        await asyncio.sleep(self._delay)
        # From here on a new schedule() starts a new write: nothing that arrives is lost.
        del self._pending[key]
        for attempt in range(1, self._attempts + 1):
            entries = [VersionEntry.from_version(v) for v in index.get(key, ())]
            entries = [e for e in entries if not e.deleting]
            if not entries:
                return  # garbage collection removes the index with its last owner
            try:
                desired = build_registry_index(model, namespace, entries)
                said = _says(desired)
                if self._written.get(key) == said:
                    return
                await self._kube.apply(CONFIGMAPS, namespace, desired)
                self._written[key] = said
                return
            except (ApiError, OSError, TimeoutError, aiohttp.ClientError) as exc:
                log.warning(
                    "index of %s/%s not written (attempt %d): %s", namespace, model, attempt, exc
                )
                await asyncio.sleep(self._delay * 2**attempt)
        log.error("gave up writing the index of %s/%s", namespace, model)

    async def close(self) -> None:
        """Make the writes already scheduled and accept no more (the operator's shutdown: a
        handler finishing meanwhile must not write through a closed client)."""
        self._closed = True
        await self.flush()

    async def flush(self) -> None:
        """Wait for every scheduled write (tests and shutdown)."""
        while self._pending:
            await asyncio.gather(*list(self._pending.values()), return_exceptions=True)


def _says(configmap: dict[str, Any]) -> tuple[Any, ...]:
    """What of an index ConfigMap the writer decides: its data, labels and owners."""
    meta = configmap.get("metadata", {})
    owners = sorted(o.get("uid", "") for o in meta.get("ownerReferences") or [])
    labels = sorted((meta.get("labels") or {}).items())
    return (configmap.get("data") or {}, labels, owners)
