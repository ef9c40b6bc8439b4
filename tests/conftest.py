"""Shared test helpers: paths and example loading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

import kubeloop

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# The cached environment is shared between checkouts: make sure it runs this one's code.
assert Path(kubeloop.__file__).resolve().is_relative_to(ROOT), (
    f"kubeloop is imported from {kubeloop.__file__}, not this checkout: run `make venv`"
)


def load_examples() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(EXAMPLES.rglob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs
