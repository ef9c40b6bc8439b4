"""Tenant PromQL scoping, checked with the real parser (never by searching the text)."""

from __future__ import annotations

from datetime import timedelta

import promql_parser as pp
import pytest

from kubeloop.planning.promql import (
    InvalidQuery,
    UnsafeQuery,
    builtin_queries,
    quote_label_value,
    scope_query,
    selectors,
    substitute,
)

NS = "team-a"


def matchers_of(vs: pp.VectorSelector) -> list[list[tuple[str, str, str]]]:
    """Each matcher set of a selector as (name, op, value) triples."""
    groups = [list(g) for g in vs.matchers.or_matchers] or [list(vs.matchers.matchers)]
    return [[(m.name, str(m.op), m.value) for m in g] for g in groups]


def assert_scoped(query: str, namespace: str = NS) -> list[pp.VectorSelector]:
    """The query parses and every selector (every `or` set) has exactly one namespace="ns"."""
    found = selectors(pp.parse(query))
    for vs in found:
        for group in matchers_of(vs):
            ns = [m for m in group if m[0] == "namespace"]
            assert ns == [("namespace", str(pp.MatchOp.Equal), namespace)], (vs.prettify(), group)
    return found


def others(vs: pp.VectorSelector) -> list[list[tuple[str, str, str]]]:
    return [sorted(m for m in g if m[0] != "namespace") for g in matchers_of(vs)]


@pytest.mark.parametrize(
    ("query", "count"),
    [
        ("up", 1),
        ('http_requests_total{job="api", code=~"5.."}', 1),
        ('rate(http_requests_total{job="api"}[5m])', 1),
        ("sum by (code) (rate(http_requests_total[5m]))", 1),
        ("sum without (instance) (up) > bool 0", 1),
        ("topk(3, sum by (le) (rate(latency_bucket[1m])))", 1),
        ("topk(scalar(count(up)), up)", 2),
        ('count_values("value", up)', 1),
        ("quantile(0.9, rate(x[5m]))", 1),
        ("errors / requests", 2),
        ("sum(rate(errors[5m])) / ignoring(code) group_left sum(rate(requests[5m]))", 2),
        ("a and on(job) b or c unless d", 4),
        ("-up", 1),
        ("(up)", 1),
        ("max_over_time(rate(x[5m])[30m:1m])", 1),
        ("max_over_time(rate(x[5m])[30m:1m] offset 10m)", 1),
        ("avg_over_time(up[1h:])", 1),
        ("rate(x[5m] offset 1h)", 1),
        ("x offset -5m", 1),
        ("rate(x[5m] @ 1609746000)", 1),
        ("x @ start()", 1),
        ("x @ end() offset 1m", 1),
        ("histogram_quantile(0.99, sum by (le) (rate(h_bucket[5m]))) * 1000", 1),
        ('label_replace(up, "dst", "$1", "src", "(.*)")', 1),
        ('absent(up{job="missing"})', 1),
        ('{__name__=~"kubeloop_.+", job="x"}', 1),
        ('x{a="b" or c="d"}', 1),
        ("clamp_min(x, 0) + vector(1) + scalar(y)", 2),
        ("time() - x", 1),
    ],
)
def test_every_selector_gets_the_namespace(query: str, count: int) -> None:
    scoped = scope_query(query, NS)
    before = selectors(pp.parse(query))
    after = assert_scoped(scoped)
    assert len(before) == len(after) == count
    # Everything else about each selector is kept: name, other matchers, offset, @.
    for old, new in zip(before, after, strict=True):
        assert new.name == old.name
        assert others(new) == others(old)
        assert new.offset == old.offset
        assert (new.at is None) == (old.at is None)
        if old.at is not None and new.at is not None:
            assert new.at.type == old.at.type
            assert new.at.at == old.at.at


def test_keeps_offset_and_range_values() -> None:
    scoped = scope_query("rate(x[5m] offset 1h)", NS)
    expr = pp.parse(scoped)
    assert isinstance(expr, pp.Call)
    matrix = expr.args[0]
    assert isinstance(matrix, pp.MatrixSelector)
    assert matrix.range == timedelta(minutes=5)
    assert matrix.vector_selector.offset == timedelta(hours=1)


def test_subquery_range_and_step_are_kept() -> None:
    expr = pp.parse(scope_query("max_over_time(rate(x[5m])[30m:1m] offset 10m)", NS))
    assert isinstance(expr, pp.Call)
    sub = expr.args[0]
    assert isinstance(sub, pp.SubqueryExpr)
    assert (sub.range, sub.step, sub.offset) == (
        timedelta(minutes=30),
        timedelta(minutes=1),
        timedelta(minutes=10),
    )


def test_aggregation_and_binary_structure_is_kept() -> None:
    query = 'sum by (code) (rate(req{job="a"}[5m])) / on(code) group_left sum(rate(req[5m]))'
    expr = pp.parse(scope_query(query, NS))
    assert isinstance(expr, pp.BinaryExpr)
    assert isinstance(expr.lhs, pp.AggregateExpr)
    assert expr.lhs.modifier is not None
    assert expr.lhs.modifier.labels == ["code"]
    assert expr.modifier is not None
    assert expr.modifier.matching is not None
    assert expr.modifier.matching.labels == ["code"]
    assert expr.modifier.card == pp.VectorMatchCardinality.ManyToOne


def test_own_namespace_is_accepted_and_not_duplicated() -> None:
    for query in ('x{namespace="team-a"}', 'x{namespace="team-a", namespace="team-a"}'):
        (vs,) = assert_scoped(scope_query(query, NS))
        assert others(vs) == [[]]


def test_every_or_set_is_scoped() -> None:
    (vs,) = assert_scoped(scope_query('x{a="1" or b="2", namespace="team-a"}', NS))
    assert len(matchers_of(vs)) == 2


def test_label_values_with_quotes_survive() -> None:
    tricky = 'x"} or y{namespace="other'
    query = f"x{{a={quote_label_value(tricky)}}}"
    (vs,) = assert_scoped(scope_query(query, NS))
    assert ("a", str(pp.MatchOp.Equal), tricky) in matchers_of(vs)[0]


def test_output_is_stable_when_scoped_again() -> None:
    once = scope_query('sum(rate(x{a="b"}[5m])) / sum(rate(y[5m] offset 1m))', NS)
    assert scope_query(once, NS) == once


def test_version_placeholder() -> None:
    scoped = scope_query(
        'sum(rate(req{version="{{version}}", model="{{ model }}"}[1m]))',
        NS,
        substitutions={"version": "churn-v2", "model": "churn"},
    )
    (vs,) = assert_scoped(scoped)
    group = matchers_of(vs)[0]
    assert ("version", str(pp.MatchOp.Equal), "churn-v2") in group
    assert ("model", str(pp.MatchOp.Equal), "churn") in group


def test_unknown_placeholder_is_refused() -> None:
    with pytest.raises(InvalidQuery, match=r"\{\{verison\}\}.*known: \{\{version\}\}"):
        scope_query('x{version="{{verison}}"}', NS, substitutions={"version": "v1"})


def test_substitution_values_cannot_break_out_of_a_matcher() -> None:
    with pytest.raises(InvalidQuery, match="may not contain quotes"):
        substitute('x{version="{{version}}"}', {"version": 'v1"} or y{a="'})


@pytest.mark.parametrize(
    "query",
    [
        'x{namespace="other"}',
        'x{namespace!="team-a"}',
        'x{namespace=~".*"}',
        'x{namespace=~"team-a"}',
        'x{namespace!~"kube-.*"}',
        'x{namespace=""}',
        'x{namespace="team-a", namespace="other"}',
        'rate(x{namespace="other"}[5m])',
        'sum(x) / sum(y{namespace="other"})',
        'max_over_time(x{namespace="other"}[30m:1m])',
        'x{a="1" or namespace="other"}',
        'topk(scalar(y{namespace="other"}), x)',
    ],
)
def test_other_namespaces_are_refused(query: str) -> None:
    with pytest.raises(UnsafeQuery, match="may only read their own namespace") as info:
        scope_query(query, NS)
    assert "selector" in str(info.value)


@pytest.mark.parametrize("query", ["x{", "sum(", "rate(x)", "x{a=}", "", 'x{__name__="y"}'])
def test_invalid_promql(query: str) -> None:
    with pytest.raises(InvalidQuery, match="invalid PromQL"):
        scope_query(query, NS)


def test_namespace_must_be_a_namespace_name() -> None:
    with pytest.raises(ValueError, match="not a Kubernetes namespace"):
        scope_query("x", 'a"b')


def test_builtin_queries() -> None:
    queries = builtin_queries(NS, "churn", "churn-v2", "5m")
    assert set(queries) == {"error_rate", "p99_latency_ms", "requests", "prediction_fractions"}
    for query in queries.values():
        for vs in assert_scoped(query):
            group = matchers_of(vs)[0]
            assert ("model", str(pp.MatchOp.Equal), "churn") in group
            assert ("version", str(pp.MatchOp.Equal), "churn-v2") in group

    error_rate = pp.parse(queries["error_rate"])
    assert isinstance(error_rate, pp.BinaryExpr)
    names = [vs.name for vs in selectors(error_rate)]
    assert names == ["kubeloop_requests_total", "kubeloop_requests_total"]
    errors = selectors(error_rate)[0]
    assert ("code", str(pp.MatchOp.Re), "5..") in matchers_of(errors)[0]

    (bucket,) = selectors(pp.parse(queries["p99_latency_ms"]))
    assert bucket.name == "kubeloop_request_duration_seconds_bucket"

    fractions = pp.parse(queries["prediction_fractions"])
    assert isinstance(fractions, pp.AggregateExpr)
    assert fractions.modifier is not None
    assert fractions.modifier.labels == ["bucket"]


def test_builtin_queries_refuse_a_bad_window() -> None:
    with pytest.raises(InvalidQuery, match="window '5 minutes'"):
        builtin_queries(NS, "churn", "v1", "5 minutes")
