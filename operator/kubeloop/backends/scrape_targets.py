"""Scrape targets of local model servers, as Prometheus ``file_sd_configs`` files.

Each served resource owns one ``<key>.json`` in the targets directory; Prometheus watches the
directory and picks changes up by itself (no reload). Files are replaced atomically so
Prometheus never reads half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")


def target_file(targets_dir: Path, key: str) -> Path:
    """The file that holds ``key``'s targets; ``key`` must be a plain file-name stem."""
    if not key or key.startswith(".") or set(key.lower()) - _KEY_CHARS:
        raise ValueError(
            f"scrape target key {key!r} must be a non-empty file-name stem of letters, "
            "digits, '-', '_' and '.', not starting with '.'"
        )
    return targets_dir / f"{key}.json"


def write_targets(targets_dir: Path, key: str, targets: list[tuple[str, dict[str, str]]]) -> None:
    """Write ``key``'s targets (``("127.0.0.1:PORT", {label: value})`` pairs), atomically.

    One file_sd group per target, so each target keeps its own labels.
    """
    path = target_file(targets_dir, key)
    groups = [{"targets": [address], "labels": dict(labels)} for address, labels in targets]
    targets_dir.mkdir(parents=True, exist_ok=True)
    # Prometheus only reads *.json: the temporary name must not match until it is complete.
    fd, tmp = tempfile.mkstemp(dir=targets_dir, prefix=f".{key}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(groups, f, indent=2, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; Prometheus may run as another user
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_targets(targets_dir: Path, key: str) -> None:
    """Forget ``key``'s targets; missing is fine."""
    target_file(targets_dir, key).unlink(missing_ok=True)
