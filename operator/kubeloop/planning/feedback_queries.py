"""PromQL for the labelled outcomes of one served version, over any window.

The runtime counts each labelled row once (``serving/feedback.py``, names in
:mod:`kubeloop.contract.serving_metrics`): confusion cells (classification), absolute and
squared errors (regression), the label delay, predictions and labels by outcome. Every quality
measure over a window is then a ratio of ``increase``s, so it holds for any window and across
restarts. Each function returns one query, scoped to the tenant's namespace by
:func:`~kubeloop.planning.promql.scope_query` (the same parser-checked scoping as tenant PromQL).

An empty or NaN result means "no labelled rows in the window": inconclusive, never 0 (the drift
controller also reads :func:`labelled_rows` to know the sample size). Labels arrive after their
predictions, so measures over a window see the labels that *arrived* in it; a window several
label delays long (or ``offset``-shifted by the delay) lines them up with their predictions.

Pure: no I/O.
"""

from __future__ import annotations

import promql_parser as pp

from kubeloop.contract import serving_metrics as metrics
from kubeloop.planning.promql import InvalidQuery, quote_label_value, scope_query

_CONFUSION = metrics.total(metrics.FEEDBACK_CONFUSION)
_ACTUAL, _PREDICTED = metrics.ACTUAL_LABEL, metrics.PREDICTED_LABEL


def accuracy(namespace: str, model: str, version: str, window: str) -> str:
    """Share of labelled rows whose predicted class was the label (0..1)."""
    correct = _increase(_CONFUSION, model, version, window, f'{metrics.CORRECT_LABEL}="true"')
    labelled = _increase(_CONFUSION, model, version, window)
    return _scoped(namespace, f"sum({correct}) / sum({labelled})")


def class_f1(namespace: str, model: str, version: str, window: str, class_name: str) -> str:
    """F1 of one class (the positive class of a binary model): 2·TP / (actual + predicted)."""
    return _scoped(namespace, _f1_by_class(model, version, window, class_name))


def macro_f1(namespace: str, model: str, version: str, window: str) -> str:
    """Mean F1 over the classes that were a label or a prediction in the window."""
    return _scoped(namespace, f"avg({_f1_by_class(model, version, window)})")


def class_precision(namespace: str, model: str, version: str, window: str, class_name: str) -> str:
    """Of the rows predicted ``class_name``, the share labelled ``class_name``."""
    tp, _, predicted = _class_counts(model, version, window, class_name)
    return _scoped(namespace, f"{tp} / on ({_ACTUAL}) {predicted}")


def class_recall(namespace: str, model: str, version: str, window: str, class_name: str) -> str:
    """Of the rows labelled ``class_name``, the share predicted ``class_name``."""
    tp, actual, _ = _class_counts(model, version, window, class_name)
    return _scoped(namespace, f"{tp} / on ({_ACTUAL}) {actual}")


def mae(namespace: str, model: str, version: str, window: str) -> str:
    """Mean absolute error of the labelled regression rows, in the target's units."""
    return _histogram_mean(metrics.FEEDBACK_ABSOLUTE_ERROR, namespace, model, version, window)


def rmse(namespace: str, model: str, version: str, window: str) -> str:
    """Root mean squared error of the labelled regression rows."""
    squared = _increase(metrics.total(metrics.FEEDBACK_SQUARED_ERROR), model, version, window)
    count = _increase(f"{metrics.FEEDBACK_ABSOLUTE_ERROR}_count", model, version, window)
    return _scoped(namespace, f"sqrt(sum({squared}) / sum({count}))")


def absolute_error_quantile(
    namespace: str, model: str, version: str, window: str, quantile: float
) -> str:
    """The ``quantile`` (0..1) of |error|, interpolated in its histogram buckets."""
    base = metrics.FEEDBACK_ABSOLUTE_ERROR
    return _histogram_quantile(base, namespace, model, version, window, quantile=quantile)


def labelled_rows(namespace: str, model: str, version: str, window: str) -> str:
    """Labels joined to their prediction in the window: the sample size of every measure."""
    return _scoped(namespace, f"sum({_labels(model, version, window, '=')})")


def label_coverage(namespace: str, model: str, version: str, window: str) -> str:
    """Labels joined per prediction made in the window (0..1, lagging by the label delay)."""
    matched = _labels(model, version, window, "=")
    predictions = _increase(metrics.total(metrics.FEEDBACK_PREDICTIONS), model, version, window)
    return _scoped(namespace, f"sum({matched}) / sum({predictions})")


def unmatched_labels(namespace: str, model: str, version: str, window: str) -> str:
    """Labels not joined in the window, by ``outcome`` (duplicate, conflict, late, unknown,
    invalid): a vector."""
    other = _labels(model, version, window, "!=")
    return _scoped(namespace, f"sum by ({metrics.OUTCOME_LABEL}) ({other})")


def mean_label_delay_s(namespace: str, model: str, version: str, window: str) -> str:
    """Mean seconds from a prediction to its label, over the labels joined in the window."""
    return _histogram_mean(metrics.FEEDBACK_LABEL_DELAY, namespace, model, version, window)


def label_delay_quantile_s(
    namespace: str, model: str, version: str, window: str, quantile: float
) -> str:
    """The ``quantile`` (0..1) of the label delay in seconds, interpolated in its buckets."""
    base = metrics.FEEDBACK_LABEL_DELAY
    return _histogram_quantile(base, namespace, model, version, window, quantile=quantile)


def request_log_drops(
    namespace: str, model: str, version: str, window: str, stream: str = "predictions"
) -> str:
    """Request-log rows of ``stream`` (predictions or labels) not written in the window, by
    ``reason``: a vector."""
    if stream not in metrics.REQUEST_LOG_STREAMS:
        raise ValueError(f"stream={stream!r}: expected one of {list(metrics.REQUEST_LOG_STREAMS)}")
    drops = _increase(
        metrics.total(metrics.REQUEST_LOG_DROPS),
        model,
        version,
        window,
        f"{metrics.STREAM_LABEL}={quote_label_value(stream)}",
    )
    return _scoped(namespace, f"sum by ({metrics.REASON_LABEL}) ({drops})")


def outcome_queries(
    namespace: str, model: str, version: str, window: str, *, task: str, positive_class: str = ""
) -> dict[str, str]:
    """Every measure that suits ``task``, by name (what the drift controller evaluates).

    Classification: ``accuracy``, ``macro_f1`` and, given ``positive_class`` (a binary
    model's), ``f1``; regression: ``mae``, ``rmse``. Both: ``labelled_rows``,
    ``label_coverage``, ``mean_label_delay_s``, ``p90_label_delay_s``.
    """
    args = (namespace, model, version, window)
    if task == "classification":
        queries = {"accuracy": accuracy(*args), "macro_f1": macro_f1(*args)}
        if positive_class:
            queries["f1"] = class_f1(*args, positive_class)
    elif task == "regression":
        queries = {"mae": mae(*args), "rmse": rmse(*args)}
    else:
        raise ValueError(f"task={task!r}: expected 'classification' or 'regression'")
    return queries | {
        "labelled_rows": labelled_rows(*args),
        "label_coverage": label_coverage(*args),
        "mean_label_delay_s": mean_label_delay_s(*args),
        "p90_label_delay_s": label_delay_quantile_s(*args, 0.9),
    }


# --- building blocks -----------------------------------------------------------------------


def _class_counts(
    model: str, version: str, window: str, class_name: str = ""
) -> tuple[str, str, str]:
    """Per-class (true positives, labelled as the class, predicted as the class), each a vector
    labelled by ``actual`` (the class); only ``class_name`` when given."""
    actual_is = f"{_ACTUAL}={quote_label_value(class_name)}" if class_name else ""
    predicted_is = f"{_PREDICTED}={quote_label_value(class_name)}" if class_name else ""
    correct = f'{metrics.CORRECT_LABEL}="true"'
    tp = _increase(_CONFUSION, model, version, window, correct, actual_is)
    actual = _increase(_CONFUSION, model, version, window, actual_is)
    predicted = _increase(_CONFUSION, model, version, window, predicted_is)
    # Predictions per class, relabelled from `predicted` to `actual` to line up with the rest.
    by_predicted = (
        f'label_replace(sum by ({_PREDICTED}) ({predicted}), "{_ACTUAL}", "$1", '
        f'"{_PREDICTED}", "(.*)")'
    )
    return (
        f"sum by ({_ACTUAL}) ({tp})",
        f"sum by ({_ACTUAL}) ({actual})",
        f"sum by ({_ACTUAL}) ({by_predicted})",
    )


def _f1_by_class(model: str, version: str, window: str, class_name: str = "") -> str:
    # `> 0` drops classes neither labelled nor predicted in the window (0 / 0).
    tp, actual, predicted = _class_counts(model, version, window, class_name)
    return f"2 * {tp} / on ({_ACTUAL}) (({actual} + on ({_ACTUAL}) {predicted}) > 0)"


def _histogram_mean(base: str, namespace: str, model: str, version: str, window: str) -> str:
    total = _increase(f"{base}_sum", model, version, window)
    count = _increase(f"{base}_count", model, version, window)
    return _scoped(namespace, f"sum({total}) / sum({count})")


def _histogram_quantile(
    base: str, namespace: str, model: str, version: str, window: str, *, quantile: float
) -> str:
    _check_quantile(quantile)
    buckets = _increase(f"{base}_bucket", model, version, window)
    return _scoped(namespace, f"histogram_quantile({quantile!r}, sum by (le) ({buckets}))")


def _labels(model: str, version: str, window: str, op: str) -> str:
    """Fed-back labels in the window whose outcome is (``=``) or is not (``!=``) matched."""
    outcome = f'{metrics.OUTCOME_LABEL}{op}"matched"'
    return _increase(metrics.total(metrics.FEEDBACK_LABELS), model, version, window, outcome)


def _increase(series: str, model: str, version: str, window: str, *matchers: str) -> str:
    _check_window(window)
    selected = [
        f"{metrics.MODEL_LABEL}={quote_label_value(model)}",
        f"{metrics.VERSION_LABEL}={quote_label_value(version)}",
        *(m for m in matchers if m),
    ]
    return f"increase({series}{{{','.join(selected)}}}[{window}])"


def _scoped(namespace: str, query: str) -> str:
    return scope_query(query, namespace)


def _check_window(window: str) -> None:
    try:
        pp.parse_duration(window)
    except ValueError as exc:
        raise InvalidQuery(
            f"window {window!r} is not a PromQL duration (e.g. 30s, 5m, 1h): {exc}"
        ) from exc


def _check_quantile(quantile: float) -> None:
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile={quantile!r}: expected a number from 0 to 1")
