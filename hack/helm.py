"""Helm from Python: how the tests and `make demo` install, upgrade, roll back and uninstall
kubeloop's chart.

pyhelm3 drives the cached ``helm`` binary (Helm 3, built by hack/cluster/build.sh) against one
kubeconfig, with Helm's cache, config and data directories under a home of our own, so the
user's repositories, registry logins and plugins neither leak in nor get written to.

pyhelm3 is asynchronous, and so is this module (the demo calls it through ``asyncio.run``). What
pyhelm3 0.5.8 lacks runs on the binary itself, with the same home (:meth:`Helm.command`): it has
no ``helm lint``, and its ``template`` passes no ``--kube-version`` (helm's default, v1.20, is
below the chart's kubeVersion, so it cannot render this chart), takes no ``--set`` and returns
parsed documents, not the rendered text a snapshot compares.

    helm = Helm(cluster.kubeconfig)
    revision = await helm.install_or_upgrade("kubeloop", "kubeloop-system", {"replicas": 0})
    deployment = revision.resource("Deployment")
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

import pyhelm3  # type: ignore[import-untyped]  # pyhelm3 ships no type information
import semver
import yaml

from hack.cluster import cluster

ROOT: Final = Path(__file__).resolve().parent.parent
CHART: Final = ROOT / "charts" / "kubeloop"
# Helm's own directories for every helm call of the tests and the demo (KUBELOOP_HELM_HOME).
HOME: Final = Path(os.environ.get("KUBELOOP_HELM_HOME", "/tmp/kubeloop-helm"))

# pyhelm3 logs every failed command as a warning, "release: not found" included (how
# Helm.current learns there is no release); applications that configure logging still see it.
logging.getLogger("pyhelm3").addHandler(logging.NullHandler())

# How helm refuses to upgrade a release that an interrupted helm left pending.
PENDING: Final = "another operation (install/upgrade/rollback) is in progress"


def default_bin_dir() -> Path:
    """Where hack/cluster/build.sh caches the Kubernetes binaries, helm among them."""
    return cluster.CACHE / f"k8s-{cluster.K8S_VERSION}" / "bin"


def helm_env(home: Path = HOME) -> dict[str, str]:
    return {
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }


def launcher(helm: Path, home: Path = HOME) -> Path:
    """A small script that runs ``helm`` with the HELM_* directories under ``home``.

    pyhelm3 starts helm through a shell with this process's environment and takes no
    environment of its own; the launcher gives helm its directories without changing
    ``os.environ`` for everything else in the process. Named by its content, written once.
    """
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in helm_env(home).items())
    script = (
        "#!/bin/sh\n"
        "# Written by kubeloop's hack/helm.py: helm with kubeloop's own Helm directories.\n"
        f"export {exports}\n"
        f'exec {shlex.quote(str(helm))} "$@"\n'
    )
    path = home / "bin" / f"helm-{hashlib.sha256(script.encode()).hexdigest()[:12]}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}")
        partial.write_text(script)
        partial.chmod(0o755)
        partial.replace(path)  # atomic: a concurrent session sees the old file or the new one
    return path


class _Command(pyhelm3.Command):  # type: ignore[misc]  # an untyped base class
    """pyhelm3's command runner, reading a version without a patch number.

    ``go install helm.sh/helm/v3/cmd/helm@v3.19.5`` (hack/cluster/build.sh) leaves helm's
    version ldflags unset, so ``helm version`` says "v3.19", which pyhelm3 refuses as SemVer; it
    only compares the version with 4.0.0 (Helm 4's renamed flags).
    """

    def client_version(self) -> semver.Version:
        text = subprocess.run(
            [self._executable, "version", "--template", "{{ .Version }}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return semver.Version.parse(text.strip().removeprefix("v"), optional_minor_and_patch=True)


@dataclass(frozen=True)
class Revision:
    """One revision of a release, with the resources Helm rendered for it."""

    release: str
    namespace: str
    number: int
    status: str  # deployed, superseded, failed, pending-upgrade, ...
    description: str
    notes: str
    resources: tuple[dict[str, Any], ...]

    def resource(self, kind: str, name: str | None = None) -> dict[str, Any]:
        """The one rendered resource of ``kind`` (named ``name``, when given)."""
        found = [
            r
            for r in self.resources
            if r.get("kind") == kind and name in (None, r.get("metadata", {}).get("name"))
        ]
        if len(found) != 1:
            names = [r["metadata"]["name"] for r in found]
            raise LookupError(f"{self.release} r{self.number}: {len(found)} {kind} {names}")
        return found[0]


@dataclass(frozen=True)
class HistoryEntry:
    number: int
    status: str
    description: str
    chart: str  # <name>-<version> of the chart the revision was made from


def _revision(rev: Any) -> Revision:
    """Our frozen copy of a pyhelm3 ReleaseRevision (made from `helm status`/`upgrade` JSON)."""
    return Revision(
        release=str(rev.release.name),
        namespace=str(rev.release.namespace),
        number=int(rev.revision),
        status=str(rev.status.value),
        description=str(rev.description or ""),
        notes=str(rev.notes or ""),
        resources=tuple(dict(r) for r in rev.resources_ or () if r),
    )


class Helm:
    """Helm 3 against one cluster, through pyhelm3."""

    def __init__(
        self,
        kubeconfig: Path,
        bin_dir: Path | None = None,
        *,
        home: Path = HOME,
        timeout: str = "3m",
    ) -> None:
        self.kubeconfig = kubeconfig
        self.home = home
        self.executable = launcher((bin_dir or default_bin_dir()) / "helm", home)
        command = _Command(
            executable=str(self.executable), kubeconfig=kubeconfig, default_timeout=timeout
        )
        self._client = pyhelm3.Client(command, executable=str(self.executable))

    @property
    def version(self) -> str:
        return str(self._client.version)

    async def install_or_upgrade(
        self,
        release: str,
        namespace: str,
        values: Mapping[str, Any],
        *,
        chart: Path = CHART,
        take_ownership: bool = False,
        wait: bool = False,
        description: str | None = None,
        recover: bool = False,
    ) -> Revision:
        """``helm upgrade --install`` of the chart directory ``chart`` with exactly ``values``
        (earlier revisions' values are not reused). ``take_ownership``: adopt resources that
        exist without belonging to the release, e.g. CRDs applied earlier with kubectl.
        ``recover``: when an interrupted helm left the release pending, make it proceedable
        (:meth:`recover`) and try again (only then: reading the release costs a second or so,
        pyhelm3 parsing its manifest, CRDs and all)."""
        loaded = await self._client.get_chart(chart)

        async def upgrade() -> Any:
            return await self._client.install_or_upgrade_release(
                release,
                loaded,
                dict(values),
                namespace=namespace,
                create_namespace=True,
                take_ownership=take_ownership,
                wait=wait,
                description=description,
            )

        try:
            rev = await upgrade()
        except pyhelm3.Error as exc:
            if not (recover and PENDING in exc.stderr.decode()):
                raise
            await self.recover(release, namespace)
            rev = await upgrade()
        return _revision(rev)

    async def current(self, release: str, namespace: str) -> Revision | None:
        """The release's current revision; None when there is no such release."""
        try:
            rev = await self._client.get_current_revision(release, namespace=namespace)
        except pyhelm3.ReleaseNotFoundError:
            return None
        return _revision(rev)

    async def recover(self, release: str, namespace: str) -> None:
        """Make a release that an interrupted helm left pending proceedable again: a pending
        install is uninstalled, a pending upgrade or rollback rolled back to the revision
        before it. (pyhelm3's get_proceedable_revision does the same but waits for every
        resource to be ready, which a Deployment on this control plane may never be.)"""
        current = await self.current(release, namespace)
        if current is None:
            return
        if current.status in ("pending-install", "uninstalling"):
            await self.uninstall(release, namespace)
        elif current.status in ("pending-upgrade", "pending-rollback"):
            await self.rollback(release, namespace)

    async def _release(self, release: str, namespace: str) -> Any:
        return (await self._client.get_current_revision(release, namespace=namespace)).release

    async def rollback(
        self, release: str, namespace: str, revision: int | None = None, *, wait: bool = False
    ) -> Revision:
        """Roll back to ``revision`` (None: the previous one); returns the new revision."""
        handle = await self._release(release, namespace)
        return _revision(await handle.rollback(revision, wait=wait))

    async def history(self, release: str, namespace: str) -> list[HistoryEntry]:
        handle = await self._release(release, namespace)
        entries = []
        for rev in await handle.history():
            chart = await rev.chart_metadata()
            entries.append(
                HistoryEntry(
                    number=int(rev.revision),
                    status=str(rev.status.value),
                    description=str(rev.description or ""),
                    chart=f"{chart.name}-{chart.version}",
                )
            )
        return sorted(entries, key=lambda e: e.number)

    async def values(
        self, release: str, namespace: str, *, revision: int | None = None, computed: bool = False
    ) -> dict[str, Any]:
        """The values a revision was made with (``computed``: merged with the chart's)."""
        handle = await self._release(release, namespace)
        rev = await (handle.current_revision() if revision is None else handle.revision(revision))
        return cast(dict[str, Any], await rev.values(computed=computed))

    async def uninstall(self, release: str, namespace: str, *, wait: bool = True) -> None:
        """``helm uninstall``; a release that is not there is already uninstalled."""
        await self._client.uninstall_release(release, namespace=namespace, wait=wait)

    def template(
        self,
        values: Mapping[str, Any],
        *,
        release: str = "kubeloop",
        namespace: str = "kubeloop-system",
        chart: Path = CHART,
        kube_version: str = cluster.K8S_VERSION,
    ) -> list[dict[str, Any]]:
        """The resources the chart renders with ``values``, without a cluster. On the binary:
        pyhelm3's template passes no --kube-version, and helm's default (v1.20) is below the
        chart's kubeVersion."""
        out = self.command(
            "template",
            release,
            str(chart),
            "--namespace",
            namespace,
            "--kube-version",
            kube_version,
            "--values",
            "-",
            stdin=json.dumps(values),
        )
        return [d for d in yaml.safe_load_all(out.stdout) if d]

    def command(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """The helm binary itself (same directories and kubeconfig), for what pyhelm3 lacks."""
        return subprocess.run(
            [str(self.executable), *args, "--kubeconfig", str(self.kubeconfig)],
            input=stdin,
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def lint(self, chart: Path = CHART) -> subprocess.CompletedProcess[str]:
        """``helm lint --strict`` (pyhelm3 has no lint)."""
        return self.command("lint", "--strict", str(chart), check=False)
