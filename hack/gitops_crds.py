#!/usr/bin/env python3
"""Fetch the real CRDs of Argo CD and Flux from the Go module proxy, so that the GitOps examples
in docs/gitops can be validated by a real API server against the real schemas.

    python -m hack.gitops_crds            # fetch what is missing, print the CRD files

Each CRD ships inside its project's Go module (Argo CD: ``manifests/crds/``; the Flux
controllers: ``config/crd/bases/``), so ``go mod download`` brings it with checksums verified
against the Go checksum database. Only the CRD files are kept, under
``$KUBELOOP_CACHE/gitops-crds/<module>@<version>/`` (with a ``SOURCE.json`` naming the module,
its version and its ``h1:`` sum); the module itself is downloaded into a throw-away module
cache, so only the first run on a machine downloads anything. The versions are pinned: the
Flux set is the one Flux v2.9.5 ships; Argo CD v3.5.7 is the newest whose go.mod the local Go
1.26 accepts (v3.6 asks for Go 1.27).

Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(
    os.environ.get(
        "KUBELOOP_CACHE",
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kubeloop",
    )
)
DOWNLOAD_TIMEOUT_S = 900
# What `go` says when it cannot reach the proxy at all (as opposed to a version it refuses).
_UNREACHABLE = (
    "dial tcp",
    "no such host",
    "connection refused",
    "i/o timeout",
    "TLS handshake timeout",
    "network is unreachable",
    "GOPROXY=off",
    "module lookup disabled",
    "context deadline exceeded",
)


@dataclass(frozen=True)
class CrdModule:
    """A Go module that carries CRD files, and which of them we need."""

    path: str
    version: str
    crd_dir: str
    files: tuple[str, ...]

    @property
    def ref(self) -> str:
        return f"{self.path}@{self.version}"

    def cache_dir(self, cache: Path = CACHE) -> Path:
        return cache / "gitops-crds" / self.ref


ARGO_CD = CrdModule(
    "github.com/argoproj/argo-cd/v3",
    "v3.5.7",
    "manifests/crds",
    ("application-crd.yaml", "appproject-crd.yaml"),
)
HELM_CONTROLLER = CrdModule(
    "github.com/fluxcd/helm-controller",
    "v1.6.4",
    "config/crd/bases",
    ("helm.toolkit.fluxcd.io_helmreleases.yaml",),
)
SOURCE_CONTROLLER = CrdModule(
    "github.com/fluxcd/source-controller",
    "v1.9.5",
    "config/crd/bases",
    (
        "source.toolkit.fluxcd.io_gitrepositories.yaml",
        "source.toolkit.fluxcd.io_helmrepositories.yaml",
        "source.toolkit.fluxcd.io_ocirepositories.yaml",
    ),
)
KUSTOMIZE_CONTROLLER = CrdModule(
    "github.com/fluxcd/kustomize-controller",
    "v1.9.5",
    "config/crd/bases",
    ("kustomize.toolkit.fluxcd.io_kustomizations.yaml",),
)
MODULES = (ARGO_CD, HELM_CONTROLLER, SOURCE_CONTROLLER, KUSTOMIZE_CONTROLLER)


class FetchError(RuntimeError):
    """A module could not be fetched, or did not carry the CRD files we expected."""

    def __init__(self, module: CrdModule, message: str) -> None:
        super().__init__(f"{module.ref}: {message}")
        self.module = module


class ProxyUnreachable(FetchError):
    """The Go module proxy (or the go command itself) is not there: nothing could be tried."""


def _go_env(workdir: Path) -> dict[str, str]:
    """A private module cache and GOPATH, the local toolchain only, and module mode outside
    any go.mod (so a go.work or go.mod above the working directory cannot interfere)."""
    return {
        **os.environ,
        "GOMODCACHE": str(workdir / "mod"),
        "GOPATH": str(workdir / "gopath"),
        "GOFLAGS": "-mod=mod",
        "GOTOOLCHAIN": "local",
        "GO111MODULE": "on",
        "GOWORK": "off",
    }


def _download(module: CrdModule, workdir: Path) -> dict[str, str]:
    """``go mod download -json`` one module into ``workdir``; its JSON answer."""
    go = shutil.which("go")
    if go is None:
        raise ProxyUnreachable(module, "the go command is not on PATH")
    try:
        result = subprocess.run(
            [go, "mod", "download", "-json", module.ref],
            cwd=workdir,
            env=_go_env(workdir),
            capture_output=True,
            text=True,
            timeout=DOWNLOAD_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ProxyUnreachable(
            module, f"go mod download took longer than {DOWNLOAD_TIMEOUT_S}s"
        ) from exc
    try:
        answer: dict[str, str] = json.loads(result.stdout) if result.stdout.strip() else {}
    except json.JSONDecodeError:
        answer = {}
    error = answer.get("Error") or (result.stderr.strip() if result.returncode else "")
    if error:
        kind = ProxyUnreachable if any(m in error for m in _UNREACHABLE) else FetchError
        raise kind(module, f"go mod download failed: {error[:1000]}")
    if not answer.get("Dir"):
        raise FetchError(module, f"go mod download named no directory: {result.stdout[:500]}")
    return answer


def _remove_tree(path: Path) -> None:
    """Remove a module cache (Go writes it read-only)."""
    for root, dirs, _files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
    shutil.rmtree(path, ignore_errors=True)


def _is_complete(module: CrdModule, target: Path) -> bool:
    return (target / "SOURCE.json").is_file() and all((target / f).is_file() for f in module.files)


def fetch(module: CrdModule, cache: Path = CACHE, *, log: bool = True) -> list[Path]:
    """The module's CRD files, downloaded on first use and cached by module and version."""
    target = module.cache_dir(cache)
    if _is_complete(module, target):
        return [target / f for f in module.files]
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".gomod-", dir=target.parent))
    try:
        started = time.monotonic()
        answer = _download(module, work)
        zip_path = Path(answer.get("Zip", ""))
        size = zip_path.stat().st_size if zip_path.is_file() else 0
        source = Path(answer["Dir"]) / module.crd_dir
        missing = [f for f in module.files if not (source / f).is_file()]
        if missing:
            raise FetchError(module, f"no {', '.join(missing)} under {module.crd_dir}/")
        staging = work / "crds"
        staging.mkdir()
        for name in module.files:
            shutil.copyfile(source / name, staging / name)
        (staging / "SOURCE.json").write_text(
            json.dumps(
                {
                    "module": module.path,
                    "version": module.version,
                    "sum": answer.get("Sum", ""),
                    "dir": module.crd_dir,
                    "files": list(module.files),
                    "zipBytes": size,
                },
                indent=2,
            )
            + "\n"
        )
        if not _is_complete(module, target):  # another run may have finished meanwhile
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        if log:
            print(
                f"[gitops-crds] {module.ref}: {size / 1e6:.1f} MB in "
                f"{time.monotonic() - started:.1f}s, kept {len(module.files)} CRD file(s)",
                file=sys.stderr,
            )
    finally:
        _remove_tree(work)
    return [target / f for f in module.files]


def ensure(modules: tuple[CrdModule, ...] = MODULES, cache: Path = CACHE) -> list[Path]:
    """Every pinned CRD file (fetching what is missing)."""
    return [path for module in modules for path in fetch(module, cache)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=CACHE, help="cache root (KUBELOOP_CACHE)")
    args = parser.parse_args(argv)
    try:
        paths = ensure(MODULES, args.cache)
    except FetchError as exc:
        print(f"[gitops-crds] {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
