"""Which (apiGroup, resource, verb) the operator really uses, derived from the code.

Every API call of ours goes through ``KubeClient`` (``backends/kube.py``) with a ``Kind``
constant as its first argument, so an AST walk over ``operator/kubeloop`` finds them all: the
method gives the verb, the constant the group and resource, ``subresource=`` the subresource.
A helper that passes its own ``kind`` parameter on (``daemon.write_status``) is followed one
level up to its callers. What kopf itself calls is the small table in ``kopf_permissions``.

``tests/integration/test_chart.py`` renders the chart and fails when its operator roles grant
anything outside ``used_permissions`` or lack anything in it. Here: the derivation itself.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from kubeloop.backends.kube import Kind, KubeClient
from tests.conftest import ROOT

PACKAGE = ROOT / "operator" / "kubeloop"
Permission = tuple[str, str, str]  # (apiGroup, resource[/subresource], verb)

# KubeClient method -> RBAC verbs. Server-side apply is a PATCH, and where the object does not
# exist yet the API server also authorises it as a create (tests/integration/test_rbac.py
# proves it); an apply to a subresource never creates.
METHOD_VERBS = {
    "get": ("get",),
    "list": ("list",),
    "watch": ("watch",),
    "create": ("create",),
    "apply": ("patch", "create"),
    "patch": ("patch",),
    "delete": ("delete",),
}
# KubeClient.request(method, kind.path(...)): a GET with a name is a get, without one a list.
HTTP_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
# Receivers that are a KubeClient (``kube``, ``ctx.kube``, ``self._kube``).
CLIENT_NAMES = {"kube", "_kube"}
CLUSTER_SCOPED = {"customresourcedefinitions", "namespaces", "clusterkopfpeerings"}
# kopf's peering CRDs as the chart installs them.
PEERING_CRDS = ROOT / "charts" / "kubeloop" / "files" / "kopf-peering-crds.yaml"


@dataclass
class Usage:
    permissions: dict[Permission, list[str]]  # -> where (file:line)
    unresolved: list[str]  # client calls whose resource cannot be read statically


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_client(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        return node.id in CLIENT_NAMES
    return isinstance(node, ast.Attribute) and node.attr in CLIENT_NAMES


def _kind(module: _Module, node: ast.expr | None) -> Kind | None:
    if isinstance(node, ast.Name):
        value = getattr(module, node.id, None)
        return value if isinstance(value, Kind) else None
    return None


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _arg(call: ast.Call, index: int, name: str) -> ast.expr | None:
    return call.args[index] if len(call.args) > index else _keyword(call, name)


def _subresource(node: ast.expr | None) -> str | None:
    if node is None or (isinstance(node, ast.Constant) and node.value is None):
        return None
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    raise ValueError(f"subresource {ast.unparse(node)} is not a literal")


def _resource(kind: Kind, subresource: str | None) -> str:
    return f"{kind.plural}/{subresource}" if subresource else kind.plural


@dataclass(frozen=True)
class _Wrapper:
    """A function that calls the client with its own parameter as the kind."""

    index: int  # positional index of the kind parameter at call sites
    param: str
    verb: str
    subresource: str | None


def _call_name(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def derive(paths: list[Path] | None = None, *, sources: dict[str, str] | None = None) -> Usage:
    """Walk the package (or ``sources``: module name -> code, for tests of the walker)."""
    trees: dict[str, tuple[_Module, ast.Module, str]] = {}
    if sources is not None:
        for name, code in sources.items():
            trees[name] = (_Module(name, code), ast.parse(code), name)
    else:
        for path in paths or sorted(PACKAGE.rglob("*.py")):
            if path == PACKAGE / "backends" / "kube.py":
                continue  # the client itself: its self.request calls are the transport
            name = _module_name(path)
            where = str(path.relative_to(ROOT))
            trees[name] = (_Module(name), ast.parse(path.read_text()), where)

    # Every call once, with the parameters of its innermost enclosing function.
    calls: list[tuple[_Module, ast.Call, list[str], str, str]] = []
    for name, (module, tree, where) in trees.items():
        _collect_calls(module, tree, [], name, where, calls)

    # Helpers that pass their own parameter on as the kind, followed to a fixpoint (a helper
    # may call another helper).
    wrappers: dict[tuple[str, str], set[_Wrapper]] = defaultdict(set)
    while True:
        usage = Usage(defaultdict(list), [])
        found: dict[tuple[str, str], set[_Wrapper]] = defaultdict(set)
        for module, call, params, fn_name, where in calls:
            at = f"{where}:{call.lineno}"
            for kind_node, verb, sub in _uses(module, call, wrappers, usage, at):
                kind = _kind(module, kind_node)
                if kind is not None:
                    usage.permissions[(kind.group, _resource(kind, sub), verb)].append(at)
                elif isinstance(kind_node, ast.Name) and kind_node.id in params:
                    index = params.index(kind_node.id) - (1 if params[:1] == ["self"] else 0)
                    module_name, _, fn = fn_name.partition(":")
                    found[(module_name, fn)].add(_Wrapper(index, kind_node.id, verb, sub))
                else:
                    usage.unresolved.append(f"{at}: {ast.unparse(call)[:120]}")
        if found == wrappers:
            return usage
        wrappers = found


def _collect_calls(
    module: _Module,
    node: ast.AST,
    params: list[str],
    fn_name: str,
    where: str,
    out: list[tuple[_Module, ast.Call, list[str], str, str]],
) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            inner = [a.arg for a in [*child.args.posonlyargs, *child.args.args]]
            qualified = f"{fn_name.partition(':')[0]}:{child.name}"
            _collect_calls(module, child, inner, qualified, where, out)
            continue
        if isinstance(child, ast.Call):
            out.append((module, child, params, fn_name, where))
        _collect_calls(module, child, params, fn_name, where, out)


def _uses(
    module: _Module,
    call: ast.Call,
    wrappers: dict[tuple[str, str], set[_Wrapper]],
    usage: Usage,
    at: str,
) -> list[tuple[ast.expr | None, str, str | None]]:
    """(the kind argument, verb, subresource) of each API use this call makes."""
    func = call.func
    if isinstance(func, ast.Attribute) and _is_client(func.value):
        if func.attr == "request":
            perm = _request_permission(module, call)
            if perm is None:
                usage.unresolved.append(f"{at}: {ast.unparse(call)[:120]}")
            else:
                usage.permissions[perm].append(at)
            return []
        if func.attr in METHOD_VERBS:
            sub = _subresource(_keyword(call, "subresource"))
            verbs = METHOD_VERBS[func.attr] if sub is None else ("patch",)
            return [(_arg(call, 0, "kind"), verb, sub) for verb in verbs]
        return []
    name = _call_name(call)
    if not any(fn == name for _, fn in wrappers):
        return []
    return [
        (_arg(call, w.index, w.param), w.verb, w.subresource)
        for w in wrappers.get(_callee(module, call) or ("", ""), ())
    ]


def _callee(module: _Module, call: ast.Call) -> tuple[str, str] | None:
    """(module, function) a call goes to: ``f(...)`` or ``mod.f(...)``, resolved through the
    calling module's globals (so a helper's namesake elsewhere is not taken for it)."""
    func = call.func
    target: object = None
    if isinstance(func, ast.Name):
        target = getattr(module, func.id, None)
    elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        target = getattr(getattr(module, func.value.id, None), func.attr, None)
    name, qualname = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    return (name, qualname) if isinstance(name, str) and isinstance(qualname, str) else None


class _Module:
    """A module's globals, imported only when a client call in it needs a Kind resolved (so
    modules without calls, e.g. ``__main__``, are never imported)."""

    def __init__(self, name: str, code: str | None = None) -> None:
        self._name, self._code = name, code
        self._values: dict[str, object] | None = None

    def __getattr__(self, attr: str) -> object:
        if attr.startswith("_"):
            raise AttributeError(attr)
        if self._values is None:
            if self._code is None:
                self._values = vars(importlib.import_module(self._name))
            else:
                self._values = {"__name__": self._name}
                exec(compile(self._code, self._name, "exec"), self._values)
        try:
            return self._values[attr]
        except KeyError:
            raise AttributeError(attr) from None


def _request_permission(module: _Module, call: ast.Call) -> Permission | None:
    """``kube.request("GET", KIND.path(namespace, name, subresource), ...)``."""
    method, path = _arg(call, 0, "method"), _arg(call, 1, "path")
    if not (isinstance(method, ast.Constant) and isinstance(path, ast.Call)):
        return None
    if not (isinstance(path.func, ast.Attribute) and path.func.attr == "path"):
        return None
    kind = _kind(module, path.func.value)
    if kind is None:
        return None
    name = _arg(path, 1, "name")
    named = name is not None and not (isinstance(name, ast.Constant) and name.value is None)
    sub = _subresource(_arg(path, 2, "subresource"))
    if method.value == "GET":
        verb = "get" if named else "list"
    elif method.value in HTTP_VERBS:
        verb = HTTP_VERBS[method.value]
    else:
        return None
    return (kind.group, _resource(kind, sub), verb)


def served_resources() -> set[tuple[str, str]]:
    """(group, plural) of every resource a kopf handler watches, spawns daemons on, or indexes
    (importing kubeloop.handlers registers them in kopf's default registry)."""
    from kopf._core.intents import registries

    import kubeloop.handlers  # noqa: F401

    registry = registries.get_default_registry()
    served: set[tuple[str, str]] = set()
    for part in (registry._watching, registry._spawning, registry._changing, registry._indexing):
        for handler in part.get_all_handlers():
            selector = handler.selector
            if selector is not None:
                plural = selector.plural or selector.any_name
                assert isinstance(plural, str), f"unexpected {selector}"
                assert selector.group, f"unexpected {selector}"
                served.add((selector.group, plural))
    return served


def peering_permissions(*, namespaced: bool) -> set[Permission]:
    """What kopf's peering calls with the chart's settings (KUBELOOP_STANDALONE=false;
    clusterwide exactly when no namespaces are watched). The resources are kopf's own choice
    (``peering.guess_selectors``), kept to the kopf.dev group whose CRDs the chart installs (kopf
    also uses its former group zalando.org when a cluster serves it). Each replica lists and
    watches the object (orchestration.spawn_missing_peerings: ``queueing.watcher``) and writes
    its keep-alive with ``patching.patch_obj``: a merge patch of the object itself, or of its
    status subresource if the CRD declared one."""
    from kopf._cogs.configs.configuration import OperatorSettings
    from kopf._core.engines import peering

    settings = OperatorSettings()
    settings.peering.standalone = False
    settings.peering.clusterwide = not namespaced
    subresources = {
        crd["spec"]["names"]["plural"]: version.get("subresources", {})
        for crd in yaml.safe_load_all(PEERING_CRDS.read_text())
        for version in crd["spec"]["versions"]
    }
    perms: set[Permission] = set()
    for selector in peering.guess_selectors(settings):
        if selector.group != "kopf.dev":
            continue
        plural = selector.plural or selector.any_name
        assert isinstance(plural, str), f"unexpected {selector}"
        assert plural in subresources, f"the chart has no CRD for {selector}"
        patched = f"{plural}/status" if "status" in subresources[plural] else plural
        perms |= {("kopf.dev", plural, "list"), ("kopf.dev", plural, "watch")}
        perms.add(("kopf.dev", patched, "patch"))
    return perms


def kopf_permissions(*, namespaced: bool) -> set[Permission]:
    """What kopf 1.45 itself calls, run as the chart runs ``kubeloop operator`` (peering on,
    annotations for progress, the chart's webhook configuration)."""
    perms: set[Permission] = set()
    for group, plural in served_resources():
        # Watching (on.*, daemon, index): an initial list, then a watch stream.
        perms |= {(group, plural, "list"), (group, plural, "watch")}
        # The finalizer and the progress/diff-base annotations: merge patches of the object.
        perms.add((group, plural, "patch"))
        # A handler's patch.status goes to the status subresource (clients/patching.py).
        perms.add((group, f"{plural}/status", "patch"))
    # kopf.event() and kopf's own warning Events: POST /api/v1/namespaces/<ns>/events.
    perms.add(("", "events", "create"))
    # reactor/observation.py resource_observer: lists and watches CRDs to notice ones created or
    # removed later. Discovery (/api, /apis, /version) is a non-resource URL every
    # authenticated user may read (system:discovery), so it needs no rule.
    perms |= {
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    }
    if namespaced:
        # namespace_observer: with namespaces given, kopf lists and watches namespaces to learn
        # which exist (without the right it assumes they all do and warns); cluster-wide it
        # watches the resources across namespaces and never reads Namespace objects.
        perms |= {("", "namespaces", "list"), ("", "namespaces", "watch")}
    # Peering: the replicas elect the active one (ClusterKopfPeering cluster-wide, KopfPeering
    # in each watched namespace).
    perms |= peering_permissions(namespaced=namespaced)
    # Not needed: admission webhook configurations (settings.admission.managed unset: the chart
    # ships them), Secrets, and nothing creates or deletes a peering object (the chart does).
    return perms


# Calls the code makes only outside the chart, each with the setting that gates it.
NOT_IN_CHART: dict[Permission, str] = {
    # webhook_server.register/unregister: the local control plane's operator registers its own
    # webhook (KUBELOOP_WEBHOOK_REGISTER, which the chart never sets); the chart ships it.
    ("admissionregistration.k8s.io", "validatingwebhookconfigurations", "patch"): "register",
    ("admissionregistration.k8s.io", "validatingwebhookconfigurations", "create"): "register",
    ("admissionregistration.k8s.io", "validatingwebhookconfigurations", "delete"): "register",
}


def used_permissions(*, namespaced: bool) -> set[Permission]:
    """What the operator, installed by the chart, calls."""
    code = set(derive().permissions) - set(NOT_IN_CHART)
    return code | kopf_permissions(namespaced=namespaced)


def expand(rules: list[dict[str, list[str]]]) -> set[Permission]:
    """An RBAC rule list as (group, resource, verb) triples."""
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
    }


def describe(perms: set[Permission]) -> str:
    return "\n".join(f"  {g or 'core'} {r} {v}" for g, r, v in sorted(perms)) or "  (none)"


# --- the derivation ------------------------------------------------------------------------


def test_every_client_call_names_its_resource() -> None:
    usage = derive()
    assert not usage.unresolved, (
        "client calls whose resource cannot be derived (pass a Kind constant):\n"
        + "\n".join(usage.unresolved)
    )


def test_the_client_methods_are_all_mapped_to_verbs() -> None:
    """A new KubeClient method must say which RBAC verb it needs."""
    methods = {
        name
        for name, fn in inspect.getmembers(KubeClient, inspect.isfunction)
        if not name.startswith("_") and name not in {"close", "request"}
    }
    assert methods == set(METHOD_VERBS), methods ^ set(METHOD_VERBS)


def test_known_calls_are_found() -> None:
    found = derive().permissions
    for perm in [
        ("serving.kserve.io", "inferenceservices", "delete"),  # serving_kserve: a local Kind
        ("serving.kserve.io", "inferenceservices", "patch"),  # apply is a PATCH...
        ("serving.kserve.io", "inferenceservices", "create"),  # ...that may create
        ("kubeloop.dev", "driftpolicies/status", "patch"),  # through daemon.write_status
        ("kubeloop.dev", "modelversions", "list"),  # kube.request("GET", MODEL_VERSIONS.path(ns))
        ("", "configmaps", "patch"),  # the registry index, server-side applied
        ("", "configmaps", "create"),
    ]:
        assert perm in found, f"{perm} not derived; found:\n{describe(set(found))}"
    assert not any(r == "secrets" for _, r, _ in found)


def test_the_walker_follows_helpers_and_refuses_what_it_cannot_read() -> None:
    code = """
from kubeloop.backends.kube import Kind
THINGS = Kind("example.dev", "v1", "things")

async def write(kube, kind, name):
    await kube.patch(kind, "ns", name, {}, subresource="status")

async def reconcile(ctx, kind):
    await write(ctx.kube, THINGS, "a")
    await ctx.kube.request("GET", THINGS.path("ns", "a"))
    await ctx.kube.request("DELETE", THINGS.path("ns", "a"))
    await ctx.kube.apply(THINGS, "ns", {})
    await ctx.kube.get(some_variable, "ns", "a")
"""
    usage = derive(sources={"example": code})
    assert set(usage.permissions) == {
        ("example.dev", "things/status", "patch"),
        ("example.dev", "things", "get"),
        ("example.dev", "things", "delete"),
        ("example.dev", "things", "patch"),
        ("example.dev", "things", "create"),
    }
    assert len(usage.unresolved) == 1
    assert "some_variable" in usage.unresolved[0]


def test_kopf_serves_the_four_kinds() -> None:
    assert served_resources() == {
        ("kubeloop.dev", p)
        for p in ("trainingruns", "modelversions", "modeldeployments", "driftpolicies")
    }


def test_the_exclusions_are_still_called() -> None:
    """An exclusion the code no longer needs is dropped from the table."""
    stale = set(NOT_IN_CHART) - set(derive().permissions)
    assert not stale, describe(stale)


@pytest.mark.parametrize("namespaced", [False, True])
def test_nothing_used_is_a_secret_or_a_crd_write(namespaced: bool) -> None:
    used = used_permissions(namespaced=namespaced)
    assert not {p for p in used if p[1] == "secrets"}
    crd_verbs = {v for g, r, v in used if r == "customresourcedefinitions"}
    assert crd_verbs <= {"get", "list", "watch"}, crd_verbs


# --- peering -------------------------------------------------------------------------------


@pytest.mark.parametrize("namespaced", [False, True], ids=["cluster-wide", "namespaced"])
def test_peering_needs_list_watch_and_patch_of_one_kind(namespaced: bool) -> None:
    plural = "kopfpeerings" if namespaced else "clusterkopfpeerings"
    assert peering_permissions(namespaced=namespaced) == {
        ("kopf.dev", plural, "list"),
        ("kopf.dev", plural, "watch"),
        ("kopf.dev", plural, "patch"),  # no status subresource: the object itself
    }


def test_the_peering_crds_keep_status_free_form_without_a_subresource() -> None:
    """kopf writes status.<identity> = {priority, lifetime, lastseen} and reads nothing else:
    status must keep unknown fields, and without a status subresource its merge patch goes to
    the object (a subresource would need patch on <plural>/status instead)."""
    crds = {c["spec"]["names"]["kind"]: c for c in yaml.safe_load_all(PEERING_CRDS.read_text())}
    assert {k: c["spec"]["scope"] for k, c in crds.items()} == {
        "ClusterKopfPeering": "Cluster",
        "KopfPeering": "Namespaced",
    }
    for crd in crds.values():
        assert crd["spec"]["group"] == "kopf.dev"
        (version,) = crd["spec"]["versions"]
        assert version["name"] == "v1"
        assert "subresources" not in version
        status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
        assert status["x-kubernetes-preserve-unknown-fields"] is True


def test_kopf_peering_writes_only_through_patch_obj() -> None:
    """A kopf upgrade whose peering makes another kind of call fails here first."""
    from kopf._core.engines import peering

    tree = ast.parse(Path(inspect.getfile(peering)).read_text())
    calls = {
        ast.unparse(node.func)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id in {"api", "patching", "watching", "fetching", "creating"}
    }
    assert calls == {"patching.patch_obj"}, calls
