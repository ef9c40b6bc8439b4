"""Where kopf keeps its own state: in the status (``status.kopf``), so that the happy path of a
reconcile is one write — the status patch that carries both our status and kopf's record of the
spec it handled. Annotations would be a second write, to the object itself, and a second watch
event for it.

Objects an older operator handled carry that state in ``kubeloop.dev/`` annotations: it is still
read from there (so an upgrade neither re-runs a creation handler nor forgets a retry in
flight), written to the status only, and the annotation is removed in the same pass. kopf
writes its diff-base only when it handles a change, so an object that does not change after
the upgrade is migrated when the operator resumes it (``migrate``, from a resume handler): once
per object, the migration's one extra write.
"""

from __future__ import annotations

from typing import Any

import kopf

from kubeloop import GROUP, VERSION

PREFIX = "kubeloop.dev"
DIFFBASE_KEY = "last-handled-configuration"


class MigratingDiffBaseStorage(kopf.MultiDiffBaseStorage):
    """The last handled spec in ``status.kopf``, read from the annotation of older objects."""

    def __init__(self) -> None:
        self.status = kopf.StatusDiffBaseStorage(name="kopf")
        self.legacy = kopf.AnnotationsDiffBaseStorage(prefix=PREFIX, key=DIFFBASE_KEY)
        super().__init__([self.status, self.legacy])

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        """The essence kopf compares (spec, labels, annotations), built once: kopf's own build
        deep-copies the whole body, status included, and a list of storages builds it once per
        storage (three copies per event, the largest CPU cost of a reconcile)."""
        if extra_fields:  # handlers on status fields need it: the general way
            return super().build(body=body, extra_fields=extra_fields)
        # What kopf's build keeps of metadata is its labels and annotations: copying the rest
        # (managedFields above all) and the status only to delete them is the waste.
        meta = body.get("metadata", {})
        kept = {k: meta[k] for k in ("labels", "annotations") if k in meta}
        slim = {k: v for k, v in body.items() if k not in ("status", "metadata")}
        essence = self.status.build(body=kopf.Body({**slim, "metadata": kept}))  # type: ignore[arg-type]
        legacy = set(self.legacy.make_keys(self.legacy.key, body=body))
        self.legacy.remove_annotations(essence, legacy)
        self.legacy.remove_empty_stanzas(essence)
        return essence

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        self.status.store(body=body, patch=patch, essence=essence)
        annotations = body.metadata.annotations
        for key in self.legacy.make_keys(self.legacy.key, body=body):
            if key in annotations:
                patch.metadata.annotations[key] = None


MARKER = f"{PREFIX}/kopf-managed"  # what kopf's annotation storages mark their prefix with


def migrate(body: kopf.Body, patch: kopf.Patch) -> None:
    """Move an older operator's diff-base annotation into ``status.kopf`` and drop kopf's
    marker annotation with it (no-op without them). The essence never saw either (the progress
    storage's ``clear`` leaves out every kubeloop.dev/ annotation), so nothing looks changed."""
    annotations = body.metadata.annotations
    key = f"{PREFIX}/{DIFFBASE_KEY}"
    legacy = annotations.get(key)
    if legacy is not None:
        if "last-handled-configuration" not in (body.status.get("kopf") or {}):
            patch.status.setdefault("kopf", {})["last-handled-configuration"] = legacy
        patch.metadata.annotations[key] = None
    if MARKER in annotations:
        patch.metadata.annotations[MARKER] = None


class MigratingProgressStorage(kopf.MultiProgressStorage):
    """Handler progress (retries, started-at) in ``status.kopf.progress``; older records are
    read from the annotations and dropped when the status takes them over."""

    def __init__(self) -> None:
        self.status = kopf.StatusProgressStorage(name="kopf")
        self.legacy = kopf.AnnotationsProgressStorage(prefix=PREFIX)
        super().__init__([self.status, self.legacy])

    def store(self, *, key: Any, record: Any, body: kopf.Body, patch: kopf.Patch) -> None:
        self.status.store(key=key, record=record, body=body, patch=patch)
        self.legacy.purge(key=key, body=body, patch=patch)

    def touch(self, *, body: kopf.Body, patch: kopf.Patch, value: str | None) -> None:
        self.status.touch(body=body, patch=patch, value=value)

    def clear(self, *, essence: Any) -> Any:
        """The essence without either storage's fields, copied once (not once per storage)."""
        essence = self.status.clear(essence=essence)
        annotations = essence.get("metadata", {}).get("annotations", {})
        ours = {key for key in annotations if key.startswith(f"{PREFIX}/")}
        self.legacy.remove_annotations(essence, ours)
        self.legacy.remove_empty_stanzas(essence)
        return essence


def legacy_state(body: kopf.Body, **_: Any) -> bool:
    """Whether an older operator's state is still on the object. The migration handler is
    filtered by it, so an object with nothing to migrate has one resume handler, not two: kopf
    runs one handler per cycle and records its progress between them, which on every restart
    was a write to every object (two, with the purge)."""
    annotations = body.metadata.annotations
    return MARKER in annotations or f"{PREFIX}/{DIFFBASE_KEY}" in annotations


def _migrate_on_resume(plural: str) -> None:
    @kopf.on.resume(GROUP, VERSION, plural, id="migrate-kopf-state", when=legacy_state)
    async def migrate_kopf_state(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        migrate(body, patch)


for _plural in ("trainingruns", "modelversions", "modeldeployments", "driftpolicies"):
    _migrate_on_resume(_plural)
