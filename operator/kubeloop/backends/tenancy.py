"""Tenancy on the filesystem: a ``file://`` URI that the text rule (``planning.tenancy``)
admitted must still lie under an allowed prefix once symlinks are resolved.

Where the operator does not see the tenant's filesystem (a path that does not exist here), the
path resolves to itself and the text rule is what holds; the kfp executor's pods then see only
the volumes mounted into them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable


def _real(path: str) -> str:
    return os.path.realpath(path)


def link_escape(uri: str, where: str, allowed: Iterable[str]) -> str:
    """Why ``uri``'s real path leaves every allowed ``file://`` prefix ('' if it does not, or
    if it is not a file URI)."""
    if not uri.startswith("file://"):
        return ""
    real = _real(uri.removeprefix("file://"))
    bases = [
        _real(p.removeprefix("file://").rstrip("/") or "/")
        for p in allowed
        if p.startswith("file://")
    ]
    if any(real == b or real.startswith(b.rstrip("/") + "/") for b in bases):
        return ""
    return (
        f"{where} {uri!r} resolves through a symlink to {real}, outside the namespace's "
        "prefixes (a path is judged after normalisation, symlinks included)"
    )
