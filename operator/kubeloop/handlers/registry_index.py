"""The per-model index ConfigMap, written in the background and coalesced.

Registering a burst of versions (a tuning sweep, a bulk import) changes one model's index many
times within milliseconds; writing it once per burst instead of once per version keeps the
operator's API traffic close to one status write per version.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from kubeloop.backends.kube import CONFIGMAPS, ApiError, KubeClient
from kubeloop.planning.model_version import VersionEntry, build_registry_index

log = logging.getLogger("kubeloop.registry")

Entries = Callable[[str, str], Iterable[VersionEntry]]


class RegistryIndexWriter:
    def __init__(self, kube: KubeClient, *, delay: float = 0.3, attempts: int = 5) -> None:
        self._kube = kube
        self._delay = delay
        self._attempts = attempts
        self._pending: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.entries: Entries = lambda namespace, model: ()

    def schedule(self, namespace: str, model: str) -> None:
        """Write the index of ``model`` soon; calls within the delay coalesce into one write."""
        key = (namespace, model)
        if key not in self._pending:
            self._pending[key] = asyncio.create_task(self._write_later(key))

    async def _write_later(self, key: tuple[str, str]) -> None:
        namespace, model = key
        await asyncio.sleep(self._delay)
        # From here on a new schedule() starts a new write: nothing that arrives is lost.
        del self._pending[key]
        for attempt in range(1, self._attempts + 1):
            entries = [e for e in self.entries(namespace, model) if not e.deleting]
            if not entries:
                return  # garbage collection removes the index with its last owner
            try:
                await self._kube.apply(
                    CONFIGMAPS, namespace, build_registry_index(model, namespace, entries)
                )
                return
            except (ApiError, OSError, TimeoutError) as exc:
                log.warning(
                    "index of %s/%s not written (attempt %d): %s", namespace, model, attempt, exc
                )
                await asyncio.sleep(self._delay * 2**attempt)
        log.error("gave up writing the index of %s/%s", namespace, model)

    async def flush(self) -> None:
        """Wait for every scheduled write (tests and shutdown)."""
        while self._pending:
            await asyncio.gather(*list(self._pending.values()), return_exceptions=True)
