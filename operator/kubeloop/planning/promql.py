"""Tenant PromQL, scoped to the tenant's namespace with a real PromQL parser.

A tenant's analysis query may only read series of its own namespace. ``scope_query`` parses the
query (``promql_parser``, Prometheus' grammar), gives every vector and matrix selector the
matcher ``namespace="<tenant>"`` and refuses a selector that already names another namespace
(or matches namespaces by ``!=``, ``=~`` or ``!~``). The query text is never edited with regular
expressions: selectors are rebuilt through the parser and the result is printed back from the AST,
then parsed once more and checked selector by selector, so a printing mistake fails closed.

Pure: no I/O.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from datetime import timedelta

import promql_parser as pp

from kubeloop.contract import serving_metrics as metrics

NAMESPACE_LABEL = "namespace"

_IDENT_START = frozenset(string.ascii_letters + "_")
_IDENT_CHARS = frozenset(string.ascii_letters + string.digits + "_")
_NAMESPACE_CHARS = frozenset(string.ascii_lowercase + string.digits + "-")
# Characters a substituted value may not carry: it lands inside a quoted label value.
_UNSAFE_SUBSTITUTION_CHARS = frozenset("\"'`\\{}\n\r")


class InvalidQuery(ValueError):
    """The PromQL does not parse, or a placeholder in it is unknown."""


class UnsafeQuery(ValueError):
    """The PromQL reads (or may read) series outside the tenant's namespace."""


def scope_query(query: str, namespace: str, *, substitutions: dict[str, str] | None = None) -> str:
    """Return ``query`` with every selector restricted to ``namespace``.

    ``{{name}}`` placeholders are replaced from ``substitutions`` first (e.g. ``{{version}}``).
    Raises ``InvalidQuery`` for PromQL that does not parse and ``UnsafeQuery`` for a selector
    with any namespace matcher other than exactly ``namespace="<namespace>"``.
    """
    _check_namespace(namespace)
    text = substitute(query, substitutions or {})
    original = _parse(text, query)
    scoped = pp.transform(original, post_visit=lambda node: _scope_node(node, namespace, query))
    printed = scoped.prettify()
    _verify(original, _parse(printed, query), namespace, query)
    return printed


def substitute(query: str, substitutions: dict[str, str]) -> str:
    """Replace ``{{name}}`` placeholders; an unknown name is an ``InvalidQuery``.

    Only ``{{identifier}}`` counts as a placeholder; other ``{{`` text is left to the parser.
    """
    for name, value in substitutions.items():
        bad = sorted(set(value) & _UNSAFE_SUBSTITUTION_CHARS)
        if bad:
            raise InvalidQuery(
                f"substitution {name}={value!r} contains {''.join(bad)!r}: "
                "values are inserted into label matchers and may not contain quotes, "
                "backslashes, braces or newlines"
            )
    out: list[str] = []
    pos = 0
    while (start := query.find("{{", pos)) >= 0:
        end = query.find("}}", start + 2)
        if end < 0:
            break
        name = query[start + 2 : end].strip()
        if not _is_identifier(name):
            out.append(query[pos : start + 2])
            pos = start + 2
            continue
        if name not in substitutions:
            known = ", ".join(f"{{{{{k}}}}}" for k in sorted(substitutions)) or "none"
            raise InvalidQuery(
                f"query {query!r} uses the unknown placeholder {{{{{name}}}}}; known: {known}"
            )
        out += [query[pos:start], substitutions[name]]
        pos = end + 2
    out.append(query[pos:])
    return "".join(out)


def builtin_queries(namespace: str, model: str, version: str, window: str) -> dict[str, str]:
    """The built-in canary analysis queries for one served version, scoped like tenant PromQL.

    - ``error_rate``: share of 5xx answers (0..1); no 5xx series at all counts as 0, no traffic
      at all is empty/NaN (inconclusive).
    - ``p99_latency_ms``: 99th percentile request latency in milliseconds.
    - ``requests``: requests served in the window.
    - ``prediction_fractions``: predictions per ``bucket`` in the window (a vector), from which
      the caller computes PSI between canary and stable.
    """
    try:
        pp.parse_duration(window)
    except ValueError as exc:
        raise InvalidQuery(
            f"analysis window {window!r} is not a PromQL duration (e.g. 30s, 5m, 1h): {exc}"
        ) from exc
    sel = (
        f"{metrics.MODEL_LABEL}={quote_label_value(model)},"
        f"{metrics.VERSION_LABEL}={quote_label_value(version)}"
    )
    requests = f"{metrics.total(metrics.REQUESTS)}{{{sel}}}[{window}]"
    errors = f'{metrics.total(metrics.REQUESTS)}{{{sel},{metrics.CODE_LABEL}=~"5.."}}[{window}]'
    buckets = f"{metrics.REQUEST_DURATION}_bucket{{{sel}}}[{window}]"  # the histogram's buckets
    predictions = f"{metrics.total(metrics.PREDICTION_BUCKETS)}{{{sel}}}[{window}]"
    queries = {
        # `or vector(0)`: a healthy version has no 5xx series at all, which is a 0% error rate,
        # not an empty (inconclusive) result.
        "error_rate": f"(sum(rate({errors})) or vector(0)) / sum(rate({requests}))",
        "p99_latency_ms": f"1000 * histogram_quantile(0.99, sum by (le) (rate({buckets})))",
        "requests": f"sum(increase({requests}))",
        "prediction_fractions": f"sum by ({metrics.BUCKET_LABEL}) (increase({predictions}))",
    }
    return {name: scope_query(q, namespace) for name, q in queries.items()}


def quote_label_value(value: str) -> str:
    """``value`` as a PromQL double-quoted string literal."""
    escaped = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
    return '"' + "".join(escaped.get(ch, ch) for ch in value) + '"'


# --- the AST work ---------------------------------------------------------------------------


def _parse(text: str, query: str) -> pp.Expr:
    try:
        return pp.parse(text)
    except ValueError as exc:
        raise InvalidQuery(f"invalid PromQL {query!r}: {exc}") from exc


def _check_namespace(namespace: str) -> None:
    if not namespace or len(namespace) > 63 or set(namespace) - _NAMESPACE_CHARS:
        raise ValueError(f"namespace {namespace!r} is not a Kubernetes namespace name")


def _is_identifier(name: str) -> bool:
    return bool(name) and name[0] in _IDENT_START and set(name) <= _IDENT_CHARS


def _groups(vs: pp.VectorSelector) -> list[list[pp.Matcher]]:
    """The selector's matcher sets; a series matches if it matches every matcher of one set.

    ``a="1" or b="2"`` parses into ``or_matchers``; a plain selector has one set, ``matchers``.
    """
    ors = [list(group) for group in vs.matchers.or_matchers]
    plain = list(vs.matchers.matchers)
    if ors and plain:  # not produced by the parser today; refuse rather than guess
        raise UnsafeQuery(f"selector {vs.prettify()} mixes plain and `or` matchers")
    return ors or [plain]


def _namespace_ok(group: list[pp.Matcher], namespace: str, vs: pp.VectorSelector) -> bool:
    """True when ``group`` already holds exactly one ``namespace="<namespace>"``.

    False when it has none; raises ``UnsafeQuery`` for any other namespace matcher.
    """
    found = [m for m in group if m.name == NAMESPACE_LABEL]
    for m in found:
        if m.op != pp.MatchOp.Equal or m.value != namespace:
            raise UnsafeQuery(
                f"selector {vs.prettify()} has the matcher {_matcher_text(m)}: tenant queries "
                f'may only read their own namespace; use {NAMESPACE_LABEL}="{namespace}" '
                "or leave the namespace out (the operator adds it)"
            )
    return len(found) == 1


def _scope_node(node: pp.Expr, namespace: str, query: str) -> pp.Expr | None:
    if not isinstance(node, pp.VectorSelector):
        return None
    groups = _groups(node)
    if all([_namespace_ok(g, namespace, node) for g in groups]):
        return None  # already scoped exactly
    ns = pp.Matcher(pp.MatchOp.Equal, NAMESPACE_LABEL, namespace)
    scoped = [[m for m in g if m.name != NAMESPACE_LABEL] + [ns] for g in groups]
    text = _selector_text(node.name, scoped, node.offset, node.at)
    try:
        return pp.parse(text)
    except ValueError as exc:  # a label our printer cannot spell: fail closed
        raise InvalidQuery(
            f"query {query!r}: cannot scope the selector {node.prettify()}: {exc}"
        ) from exc


def _selector_text(
    name: str | None,
    groups: list[list[pp.Matcher]],
    offset: timedelta | None,
    at: pp.AtModifier | None,
) -> str:
    """A selector spelled out for the parser; the final text is printed by the parser itself."""
    body = " or ".join(",".join(_matcher_text(m) for m in g) for g in groups)
    text = f"{name or ''}{{{body}}}"
    if at is not None:
        if at.type == pp.AtModifierType.Start:
            text += " @ start()"
        elif at.type == pp.AtModifierType.End:
            text += " @ end()"
        elif at.at is not None:
            text += f" @ {at.at.timestamp():.6f}"
    if offset is not None and offset:
        millis = round(offset / timedelta(milliseconds=1))
        text += f" offset {'-' if millis < 0 else ''}{abs(millis)}ms"
    return text


def _matcher_text(m: pp.Matcher) -> str:
    if m.op == pp.MatchOp.Equal:
        op = "="
    elif m.op == pp.MatchOp.NotEqual:
        op = "!="
    elif m.op == pp.MatchOp.Re:
        op = "=~"
    else:
        op = "!~"
    name = m.name if _is_identifier(m.name) else quote_label_value(m.name)
    return f"{name}{op}{quote_label_value(m.value)}"


@dataclass(frozen=True)
class _Shape:
    """What a selector selects, apart from the namespace matcher."""

    name: str | None
    groups: tuple[tuple[tuple[str, str, str], ...], ...]
    offset: timedelta | None
    at: str


def _shape(vs: pp.VectorSelector) -> _Shape:
    groups = tuple(
        tuple(sorted((m.name, _matcher_text(m), m.value) for m in g if m.name != NAMESPACE_LABEL))
        for g in _groups(vs)
    )
    at = "" if vs.at is None else f"{vs.at.type}:{vs.at.at}"
    return _Shape(vs.name, groups, vs.offset or None, at)


def selectors(expr: pp.Expr) -> list[pp.VectorSelector]:
    """Every vector selector in ``expr`` (matrix selectors included), in source order.

    Walks the node types explicitly: an unknown node type is refused, never skipped.
    """
    if isinstance(expr, pp.VectorSelector):
        return [expr]
    if isinstance(expr, pp.MatrixSelector):
        return [expr.vector_selector]
    if isinstance(expr, (pp.NumberLiteral, pp.StringLiteral)):
        return []
    if isinstance(expr, (pp.ParenExpr, pp.UnaryExpr, pp.SubqueryExpr)):
        return selectors(expr.expr)
    if isinstance(expr, pp.BinaryExpr):
        return selectors(expr.lhs) + selectors(expr.rhs)
    if isinstance(expr, pp.AggregateExpr):
        param = selectors(expr.param) if isinstance(expr.param, pp.Expr) else []
        return param + selectors(expr.expr)
    if isinstance(expr, pp.Call):
        return [vs for arg in expr.args if isinstance(arg, pp.Expr) for vs in selectors(arg)]
    raise UnsafeQuery(f"cannot check the PromQL node {type(expr).__name__}: {expr.prettify()}")


def _verify(original: pp.Expr, printed: pp.Expr, namespace: str, query: str) -> None:
    """The printed query selects what the tenant wrote, each selector in ``namespace`` only."""
    before, after = selectors(original), selectors(printed)
    if len(before) != len(after):
        raise UnsafeQuery(
            f"query {query!r}: scoping changed the number of selectors "
            f"({len(before)} → {len(after)})"
        )
    for old, new in zip(before, after, strict=True):
        if not all([_namespace_ok(g, namespace, new) for g in _groups(new)]):
            raise UnsafeQuery(f"query {query!r}: selector {new.prettify()} is not scoped")
        if _shape(old) != _shape(new):
            raise UnsafeQuery(
                f"query {query!r}: scoping changed the selector {old.prettify()} "
                f"into {new.prettify()}"
            )
