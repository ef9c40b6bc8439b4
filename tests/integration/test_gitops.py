"""The GitOps examples in docs/gitops, held to the real schemas and to the real operator.

- Argo CD's and Flux's own CRDs (fetched from the Go module proxy by hack/gitops_crds.py) are
  installed into the local API server, and every platform example is applied with
  ``--dry-run=server --validate=strict``: a misspelled field is refused, as the negative cases
  show.
- The tenant examples are applied the same way into a fresh namespace, against kubeloop's CRDs.
- The chart values the platform examples set are checked against values.schema.json (and
  rendered by helm), and so are the names their ignore rules point at.
- The real operator reconciles the tenant examples applied by server-side apply, and the drift
  a sync tool computes is measured: none from what the operator writes (finalizers, kopf's
  annotations, status); an alias moved by the registry is drift, and exactly what the examples'
  ignore rules cover.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # no types-jsonschema in the env
import pytest
import yaml
from hack import gitops_crds
from kopf.testing import KopfRunner

from kubeloop.contract.labels import APPROVE_ANNOTATION
from tests.conftest import ROOT
from tests.integration.conftest import LocalCluster, eventually

GITOPS = ROOT / "docs" / "gitops"
PLATFORM = GITOPS / "platform"
TEAM = GITOPS / "tenants" / "team-a"
CHART = ROOT / "charts" / "kubeloop"
KUBELOOP_CRDS = ROOT / "crds"
PLATFORM_FILES = sorted(PLATFORM.rglob("*.yaml"))
TENANT_KINDS = {"TrainingRun", "ModelDeployment", "DriftPolicy"}
Doc = dict[str, Any]


def load(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def platform_docs() -> list[tuple[Path, Doc]]:
    return [(path, doc) for path in PLATFORM_FILES for doc in load(path)]


def only(kind: str, path: Path) -> Doc:
    found = [d for d in load(path) if d["kind"] == kind]
    assert len(found) == 1, f"{path.relative_to(ROOT)}: {len(found)} {kind}s"
    return found[0]


def dry_run(
    cluster: LocalCluster, docs: list[Doc], namespace: str | None = None
) -> subprocess.CompletedProcess[str]:
    args = ["apply", "--dry-run=server", "--validate=strict", "-f", "-"]
    if namespace:
        args += ["-n", namespace]
    return cluster.kubectl(*args, input=yaml.safe_dump_all(docs), check=False)


# --- the fetched CRDs in the API server --------------------------------------------------------


@pytest.fixture(scope="module")
def gitops(crds: LocalCluster) -> Iterator[LocalCluster]:
    """The API server with Argo CD's and Flux's CRDs, and the namespaces the examples name."""
    try:
        files = gitops_crds.ensure()
    except gitops_crds.ProxyUnreachable as exc:
        pytest.skip(f"could not fetch {exc.module.ref} from the Go module proxy: {exc}")
    names = [load(path)[0]["metadata"]["name"] for path in files]
    for path in files:
        crds.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    crds.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{n}" for n in names)
    )
    namespaces = sorted(
        {
            doc["metadata"]["namespace"]
            for _, doc in platform_docs()
            if "namespace" in doc["metadata"]
        }
    )
    existing = set(crds.kubectl("get", "namespaces", "-o", "name").stdout.split())
    created = [ns for ns in namespaces if f"namespace/{ns}" not in existing]
    for ns in created:
        crds.kubectl("create", "namespace", ns)
    yield crds
    for ns in created:
        crds.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    crds.kubectl("delete", "crd", *names, "--wait=false", check=False)


def test_the_examples_cover_both_tools_and_the_tenant() -> None:
    kinds = {(path.parent.name, doc["kind"]) for path, doc in platform_docs()}
    assert {("argocd", "Application"), ("argocd", "AppProject")} <= kinds
    assert {
        ("flux", k)
        for k in (
            "HelmRelease",
            "HelmRepository",
            "OCIRepository",
            "GitRepository",
            "Kustomization",
        )
    } <= kinds
    assert {d["kind"] for path in TEAM.glob("*.yaml") for d in load(path)} == TENANT_KINDS


@pytest.mark.parametrize("path", PLATFORM_FILES, ids=lambda p: str(p.relative_to(PLATFORM)))
def test_platform_example_passes_strict_server_validation(gitops: LocalCluster, path: Path) -> None:
    docs = load(path)
    result = dry_run(gitops, docs)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("(server dry run)") == len(docs), result.stdout


async def test_tenant_examples_pass_strict_server_validation(
    crds: LocalCluster, namespace: str
) -> None:
    docs = [d for path in sorted(TEAM.glob("*.yaml")) for d in load(path)]
    # The sync tool decides the namespace; a manifest that named one would fight it.
    assert not [d["metadata"]["name"] for d in docs if "namespace" in d["metadata"]]
    result = dry_run(crds, docs, namespace)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("(server dry run)") == len(docs), result.stdout


def _rename(doc: Doc, path: tuple[str, ...], new: str) -> None:
    *parents, key = path
    node = doc
    for part in parents:
        node = node[part]
    node[new] = node.pop(key)


def _set(doc: Doc, path: tuple[str, ...], value: Any) -> None:
    *parents, key = path
    node = doc
    for part in parents:
        node = node[part]
    node[key] = value


TYPOS = [
    pytest.param(
        PLATFORM / "argocd" / "kubeloop.yaml",
        "Application",
        lambda d: _rename(d, ("spec", "syncPolicy"), "syncPolcy"),
        'unknown field "spec.syncPolcy"',
        id="Application-misspelled-field",
    ),
    pytest.param(
        PLATFORM / "argocd" / "team-a.yaml",
        "AppProject",
        lambda d: _rename(d, ("spec", "destinations"), "destination"),
        'unknown field "spec.destination"',
        id="AppProject-misspelled-field",
    ),
    pytest.param(
        PLATFORM / "flux" / "kubeloop-ocirepository.yaml",
        "HelmRelease",
        lambda d: _set(d, ("spec", "install", "crds"), "Replace"),
        'spec.install.crds: Unsupported value: "Replace"',
        id="HelmRelease-bad-crds-policy",
    ),
    pytest.param(
        PLATFORM / "flux" / "kubeloop-helmrepository.yaml",
        "HelmRelease",
        # Argo CD's name for the values, in a HelmRelease.
        lambda d: _rename(d, ("spec", "values"), "valuesObject"),
        'unknown field "spec.valuesObject"',
        id="HelmRelease-argo-field",
    ),
    pytest.param(
        PLATFORM / "flux" / "team-a.yaml",
        "Kustomization",
        lambda d: _rename(d, ("spec", "targetNamespace"), "targetNamespaces"),
        'unknown field "spec.targetNamespaces"',
        id="Kustomization-misspelled-field",
    ),
    pytest.param(
        TEAM / "trainingrun.yaml",
        "TrainingRun",
        lambda d: _rename(d, ("spec", "model", "hiddenLayers"), "hiddenLayer"),
        'unknown field "spec.model.hiddenLayer"',
        id="TrainingRun-misspelled-field",
    ),
]


@pytest.mark.parametrize(("path", "kind", "mutate", "refusal"), TYPOS)
def test_a_typo_is_refused(
    gitops: LocalCluster, path: Path, kind: str, mutate: Callable[[Doc], None], refusal: str
) -> None:
    """The check can fail: the same document, one field wrong, is refused by name (and the
    document as written passes in the same namespace)."""
    doc = only(kind, path)
    namespace = None if "namespace" in doc["metadata"] else "team-a"
    assert dry_run(gitops, [doc], namespace).returncode == 0
    wrong = copy.deepcopy(doc)
    mutate(wrong)
    result = dry_run(gitops, [wrong], namespace)
    assert result.returncode != 0, result.stdout
    assert refusal in result.stderr, result.stderr


# --- the chart values the platform examples set -------------------------------------------------


def chart_values() -> dict[str, Doc]:
    """The values of every kubeloop install in the platform examples, by file and kind."""
    found: dict[str, Doc] = {}
    for path, doc in platform_docs():
        where = f"{path.relative_to(PLATFORM)}:{doc['kind']}"
        if doc["kind"] == "Application" and doc["spec"]["source"].get("chart") == "kubeloop":
            found[where] = doc["spec"]["source"]["helm"]["valuesObject"]
        elif doc["kind"] == "HelmRelease":
            found[where] = doc["spec"]["values"]
    return found


def merged(base: Doc, override: Doc) -> Doc:
    """Helm's merge of a values file over the chart's defaults (maps merge, the rest replace)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def schema_errors(values: Doc) -> list[str]:
    schema = json.loads((CHART / "values.schema.json").read_text())
    # values.schema.json names draft-07 by its https URL, which jsonschema does not know.
    draft7 = "draft-07" in schema.get("$schema", "")
    validator_cls = (
        jsonschema.Draft7Validator if draft7 else jsonschema.validators.validator_for(schema)
    )
    validator_cls.check_schema(schema)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    validator = validator_cls(schema)
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(merged(defaults, values))
    ]


def helm_template(
    cluster: LocalCluster, values: Doc, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """``helm template`` of the chart with ``values`` (Helm checks them against the schema)."""
    values_file = tmp_path / f"values-{uuid.uuid4().hex[:6]}.yaml"
    values_file.write_text(yaml.safe_dump(values))
    home = tmp_path / "helm"
    args = ["template", "kubeloop", str(CHART), "-n", "kubeloop-system", "--kube-version", "1.35.4"]
    return subprocess.run(
        [str(cluster.bin_dir / "helm"), *args, "-f", str(values_file)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={
            **os.environ,
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        },
    )


def test_every_platform_example_sets_the_same_valid_values() -> None:
    values = chart_values()
    assert len(values) == 3, sorted(values)  # the Argo CD Application, two HelmReleases
    for where, vals in values.items():
        assert vals, f"{where} sets no values"
        assert schema_errors(vals) == [], where
    first, *rest = values.values()
    assert all(v == first for v in rest), "the platform examples disagree on the values"


def test_an_unknown_value_is_refused_by_the_schema(cluster: LocalCluster, tmp_path: Path) -> None:
    values = copy.deepcopy(next(iter(chart_values().values())))
    values["operator"]["watchNamespace"] = ["team-a"]  # watchNamespaces, misspelled
    errors = schema_errors(values)
    assert len(errors) == 1, errors
    assert "'watchNamespace' was unexpected" in errors[0], errors
    result = helm_template(cluster, values, tmp_path)
    assert result.returncode != 0
    assert "watchNamespace" in result.stderr, result.stderr[-2000:]


def test_the_argo_cd_ignore_rules_name_what_the_chart_renders(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """The webhook Secret and configuration the platform Application ignores are the objects
    the chart renders with that release name and those values."""
    app = only("Application", PLATFORM / "argocd" / "kubeloop.yaml")
    result = helm_template(cluster, app["spec"]["source"]["helm"]["valuesObject"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert app["spec"]["source"]["helm"]["releaseName"] == "kubeloop"
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in rendered}
    for rule in app["spec"]["ignoreDifferences"]:
        target = by_kind.get((rule["kind"], rule["name"]))
        assert target is not None, f"the chart renders no {rule['kind']} {rule['name']}"
    secret = by_kind[("Secret", "kubeloop-webhook-cert")]
    assert set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt"}
    webhook = by_kind[("ValidatingWebhookConfiguration", "kubeloop")]
    assert all(w["clientConfig"]["caBundle"] for w in webhook["webhooks"])
    assert "CreateNamespace=true" in app["spec"]["syncPolicy"]["syncOptions"]
    assert "RespectIgnoreDifferences=true" in app["spec"]["syncPolicy"]["syncOptions"]


# --- the tenant's lane and the operator's fields ------------------------------------------------


def _schema_has(schema: Doc, pointer: str) -> bool:
    node = schema
    for part in pointer.strip("/").split("/"):
        props = node.get("properties") or {}
        if part not in props:
            return False
        node = props[part]
    return True


@functools.cache
def _crd_schema(kind: str) -> Doc:
    for path in KUBELOOP_CRDS.glob("*.yaml"):
        crd = load(path)[0]
        if crd["spec"]["names"]["kind"] == kind:
            schema: Doc = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
            return schema
    raise AssertionError(f"no CRD for {kind} in {KUBELOOP_CRDS}")


def tenant_ignore_rules() -> dict[str, dict[str, list[str]]]:
    """The ignore rules of each tool's tenant sync, as {tool: {kind: [JSON pointers]}}."""
    app = only("Application", PLATFORM / "argocd" / "team-a.yaml")
    kustomization = only("Kustomization", PLATFORM / "flux" / "team-a.yaml")
    rules: dict[str, dict[str, list[str]]] = {"argocd": {}, "flux": {}}
    for rule in app["spec"]["ignoreDifferences"]:
        assert rule["group"] == "kubeloop.dev", rule
        rules["argocd"].setdefault(rule["kind"], []).extend(rule["jsonPointers"])
    for rule in kustomization["spec"]["ignore"]:
        assert rule["target"]["group"] == "kubeloop.dev", rule
        rules["flux"].setdefault(rule["target"]["kind"], []).extend(rule["paths"])
    return rules


def test_ignore_rules_point_at_fields_that_exist() -> None:
    for tool, by_kind in tenant_ignore_rules().items():
        for kind, pointers in by_kind.items():
            for pointer in pointers:
                if pointer.startswith("/metadata/annotations/"):
                    key = pointer.removeprefix("/metadata/annotations/").replace("~1", "/")
                    assert key == APPROVE_ANNOTATION, (tool, kind, pointer)
                else:
                    assert _schema_has(_crd_schema(kind), pointer), (tool, kind, pointer)


def test_tenants_stay_in_their_lane() -> None:
    project = only("AppProject", PLATFORM / "argocd" / "team-a.yaml")
    app = only("Application", PLATFORM / "argocd" / "team-a.yaml")
    spec = project["spec"]
    assert spec["destinations"] == [
        {"server": "https://kubernetes.default.svc", "namespace": "team-a"}
    ]
    assert spec.get("clusterResourceWhitelist", []) == []
    assert {r["group"] for r in spec["namespaceResourceWhitelist"]} == {"kubeloop.dev"}
    assert app["spec"]["project"] == project["metadata"]["name"]
    assert app["spec"]["destination"] == spec["destinations"][0]
    assert app["spec"]["source"]["repoURL"] in spec["sourceRepos"]
    assert "CreateNamespace=true" not in app["spec"]["syncPolicy"].get("syncOptions", [])

    flux = {d["kind"]: d for d in load(PLATFORM / "flux" / "team-a.yaml")}
    ks, binding = flux["Kustomization"], flux["RoleBinding"]
    ns = ks["metadata"]["namespace"]
    assert ks["spec"]["targetNamespace"] == ns
    assert ks["spec"]["sourceRef"]["name"] == flux["GitRepository"]["metadata"]["name"]
    assert "namespace" not in ks["spec"]["sourceRef"]
    assert binding["metadata"]["namespace"] == ns
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "kubeloop-edit",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": ks["spec"]["serviceAccountName"], "namespace": ns}
    ]


def _pointers(a: Any, b: Any, at: str = "") -> list[str]:
    """JSON pointers where ``a`` and ``b`` differ (lists compare whole, as atomic lists do)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            escaped = key.replace("~", "~0").replace("/", "~1")
            out += _pointers(a.get(key), b.get(key), f"{at}/{escaped}")
        return out
    return [] if a == b else [at or "/"]


def drift(
    cluster: LocalCluster, namespace: str, doc: Doc, manager: str, ignore: Sequence[str] = ()
) -> list[str]:
    """What a server-side-apply sync tool sees as drift between the live object and its Git
    manifest: a server-side dry-run apply of the manifest against the live object, compared
    on labels, annotations and everything outside metadata and status (as Flux's
    kustomize-controller compares them), less the ``ignore`` pointers."""
    live = json.loads(
        cluster.kubectl(
            "get", doc["kind"].lower(), doc["metadata"]["name"], "-n", namespace, "-o", "json"
        ).stdout
    )
    dry = json.loads(
        cluster.kubectl(
            "apply",
            "--server-side",
            "--dry-run=server",
            "--force-conflicts",
            f"--field-manager={manager}",
            "-n",
            namespace,
            "-o",
            "json",
            "-f",
            "-",
            input=yaml.safe_dump(doc),
        ).stdout
    )

    def comparable(obj: Doc) -> Doc:
        meta = obj["metadata"]
        rest = {k: v for k, v in obj.items() if k not in ("metadata", "status")}
        return {
            "metadata": {
                "labels": meta.get("labels") or {},
                "annotations": meta.get("annotations") or {},
            },
            **rest,
        }

    found = _pointers(comparable(live), comparable(dry))
    return [p for p in found if not any(p == i or p.startswith(i + "/") for i in ignore)]


def _managers_of(obj: Doc, *path: str) -> set[str]:
    owners = set()
    for entry in obj["metadata"].get("managedFields", []):
        node = entry.get("fieldsV1", {})
        for part in path:
            node = node.get(f"f:{part}")
            if node is None:
                break
        else:
            owners.add(f"{entry['manager']}/{entry['operation']}/{entry.get('subresource', '')}")
    return owners


def _version(name: str, number: int, uri: str, aliases: list[str]) -> Doc:
    return {
        "apiVersion": "kubeloop.dev/v1alpha1",
        "kind": "ModelVersion",
        "metadata": {"name": name},
        "spec": {
            "modelName": "churn",
            "version": number,
            "task": "classification",
            "artifact": {"uri": uri, "format": "torch"},
            "metrics": {"f1": 0.9},
            "aliases": aliases,
        },
    }


async def test_what_the_operator_writes_is_drift_only_where_the_examples_ignore_it(
    crds: LocalCluster, operator: KopfRunner, namespace: str, artifact_root: Path
) -> None:
    """The tenant's manifests applied as Argo CD applies them (server-side, field manager
    argocd-controller), reconciled by the real operator: its finalizer, kopf's annotations and
    the status are no drift; an alias the registry moves is, and the examples' ignore rules
    cover exactly that."""
    git: list[Doc] = [d for path in sorted(TEAM.glob("*.yaml")) for d in load(path)]
    for doc in git:
        if doc["kind"] == "TrainingRun":
            doc["spec"]["suspend"] = True  # held before submission: nothing trains
    for number in (1, 2):
        folder = artifact_root / namespace / "churn" / f"v{number}"
        folder.mkdir(parents=True)
        (folder / "model.pt").write_bytes(b"weights")
    hand_registered = _version("churn-v1", 1, f"file://{artifact_root}/{namespace}/churn/v1", [])
    hand_registered["spec"]["aliases"] = ["candidate"]
    git.append(hand_registered)
    crds.kubectl(
        "apply",
        "--server-side",
        "--field-manager=argocd-controller",
        "-n",
        namespace,
        "-f",
        "-",
        input=yaml.safe_dump_all(git),
    )

    def live(kind: str, name: str) -> Doc:
        args = ("get", kind.lower(), name, "-n", namespace, "-o", "json", "--show-managed-fields")
        out = crds.kubectl(*args)
        obj: Doc = json.loads(out.stdout)
        return obj

    async def reconciled() -> bool:
        return all(
            (live(d["kind"], d["metadata"]["name"]).get("status") or {}).get("observedGeneration")
            for d in git
        )

    await eventually(reconciled, within=45, what="the operator's first pass on every object")
    objects = {d["kind"]: live(d["kind"], d["metadata"]["name"]) for d in git}
    # What the README says the operator (kopf) writes on the objects of a tenant's repository.
    for kind in ("TrainingRun", "ModelDeployment", "DriftPolicy"):
        assert objects[kind]["metadata"]["finalizers"] == ["kubeloop.dev/finalizer"], kind
        assert _managers_of(objects[kind], "metadata", "finalizers") == {"kopf/Update/"}, kind
        # The daemon's status, and kopf's state where it keeps any (status.kopf): these kinds
        # are reconciled by daemons, and kopf records a handled spec only when a change handler
        # matched (on resume, the migration of an older operator's annotations; progress while
        # a deletion handler retries).
        managers = _managers_of(objects[kind], "status")
        assert "kubeloop/Update/status" in managers, kind
        assert managers <= {"kubeloop/Update/status", "kopf/Update/status"}, (kind, managers)
    for kind in ("TrainingRun", "ModelDeployment", "DriftPolicy", "ModelVersion"):
        # kopf keeps its state in the status: no annotation of its own on the object.
        annotations = objects[kind]["metadata"].get("annotations", {})
        assert not any(a.startswith("kubeloop.dev/") for a in annotations), (kind, annotations)
    assert "last-handled-configuration" in objects["ModelVersion"]["status"]["kopf"]
    assert "finalizers" not in objects["ModelVersion"]["metadata"]
    assert _managers_of(objects["ModelVersion"], "status") == {"kopf/Update/status"}
    for doc in git:
        assert drift(crds, namespace, doc, "argocd-controller") == [], doc["kind"]

    # A second version claims the alias (as a registration or a promotion does): the registry
    # takes it from the hand-registered version, by a merge patch of its spec.
    crds.kubectl(
        "create",
        "-n",
        namespace,
        "-f",
        "-",
        input=yaml.safe_dump(
            _version("churn-v2", 2, f"file://{artifact_root}/{namespace}/churn/v2", ["candidate"])
        ),
    )

    async def moved() -> bool:
        return bool(live("ModelVersion", "churn-v1")["spec"]["aliases"] == [])

    await eventually(moved, within=30, what="the alias moved off churn-v1")
    v1 = live("ModelVersion", "churn-v1")
    assert _managers_of(v1, "spec", "aliases") == {"kubeloop/Update/"}
    for manager in ("argocd-controller", "kustomize-controller"):
        assert drift(crds, namespace, hand_registered, manager) == ["/spec/aliases"], manager
    for tool, by_kind in tenant_ignore_rules().items():
        ignored = by_kind["ModelVersion"]
        assert drift(crds, namespace, hand_registered, "argocd-controller", ignored) == [], tool
