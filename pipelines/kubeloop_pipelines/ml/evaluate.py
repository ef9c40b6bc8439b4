"""Test-split evaluation: metrics, registration gates, the learning-curve verdict, serving cost
(latency and size of the exported artifact), plots and a self-contained HTML report.

Conventions
-----------
- Classification outputs are class probabilities ``(n, n_classes)`` (what
  :meth:`kubeloop.serving.artifact.LoadedModel.predict` returns) or predicted class indices
  ``(n,)``; without probabilities ``roc_auc``/``pr_auc`` are left out.
- Binary classification: the *positive* class is the last class (index 1: preprocessing
  orders the labels so that ``is_fraud=1``/``malignant`` come last), as in ``train.score``, so
  a test metric means what the same validation metric meant during tuning. Multiclass:
  precision/recall/f1 are macro averages; roc_auc and pr_auc are one-vs-rest macro averages
  over the classes present in ``y_true``.
- ``minority_recall`` is the recall of the least frequent class present in ``y_true`` (the
  first such class on a tie, as in ``train.score``).
- ``latency_ms`` is the median wall time of one ``predict`` call on a batch of
  :data:`SERVING_BATCH` raw rows (scaling, program and softmax, as serving runs it) on one
  intra-op thread;
  ``size_mb`` is the size of ``model.pt2`` in MB (10^6 bytes).
"""

from __future__ import annotations

import base64
import html
import io
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn import metrics as skm

from kubeloop.api.training_run import Gate
from kubeloop.contract.artifact import model_size_bytes
from kubeloop.contract.evaluation import gate_metrics
from kubeloop.serving.artifact import LoadedModel
from kubeloop_pipelines.contract import StepError

SERVING_BATCH = 32
POSITIVE = 1  # the positive class of binary tasks
ROC_MAX_POINTS = 200
# Learning-curve rules (see learning_curve_verdict).
MIN_EPOCHS = 3
RISE_TOLERANCE = 0.10  # validation loss this far (relative) above its minimum → rising
GAP_ABSOLUTE = 0.10  # final validation - train loss …
GAP_RATIO = 2.0  # … and validation ≥ this x train → generalisation gap
FLAT_IMPROVEMENT = 0.10  # train loss fell by less than this fraction of its start → flat
STILL_FALLING = 0.05  # both losses fell by more than this over the last quarter → not converged
HIGH_LOSS = 0.8  # final train loss ≥ this x the loss of guessing → too high

OPS = {
    ">=": lambda a, b: a >= b,
    ">": lambda a, b: a > b,
    "<=": lambda a, b: a <= b,
    "<": lambda a, b: a < b,
}


def available_metrics(task: str, *, ranked: bool = False) -> tuple[str, ...]:
    """The metrics evaluation produces for ``task`` (gates may use any of them); ``ranked``:
    rows are ranked within data.groupColumn groups, adding map_at_k and ndcg_at_k."""
    return gate_metrics(task, ranked=ranked)


# --- metrics -----------------------------------------------------------------------------


def minority_class(y_true: npt.ArrayLike, n_classes: int) -> int:
    """The least frequent class present in ``y_true`` (the lowest index on a tie)."""
    counts = np.bincount(np.asarray(y_true, dtype=np.int64), minlength=n_classes)
    present = np.flatnonzero(counts)
    if len(present) == 0:
        return 0
    return int(present[np.argmin(counts[present])])


def _split_outputs(
    y_pred_or_proba: npt.ArrayLike, n_classes: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64] | None]:
    out = np.asarray(y_pred_or_proba)
    if out.ndim == 2:
        if out.shape[1] != n_classes:
            raise ValueError(f"probabilities have {out.shape[1]} columns; expected {n_classes}")
        proba = out.astype(np.float64)
        return np.asarray(proba.argmax(axis=1), dtype=np.int64), proba
    return out.astype(np.int64), None


def _ovr_average(y: npt.NDArray[np.int64], proba: npt.NDArray[np.float64], score: Any) -> float:
    """Macro average of a binary ranking score over the classes with positives and negatives."""
    values = [
        float(score(y == c, proba[:, c]))
        for c in range(proba.shape[1])
        if 0 < int((y == c).sum()) < len(y)
    ]
    return float(np.mean(values)) if values else float("nan")


def compute_metrics(
    task: str,
    y_true: npt.ArrayLike,
    y_pred_or_proba: npt.ArrayLike,
    *,
    classes: Sequence[str] = (),
) -> dict[str, float]:
    """Test metrics of one task (see the module docstring for the conventions). Metrics that
    are undefined on this data (e.g. roc_auc with one class in ``y_true``) are left out."""
    if task == "regression":
        truth = np.asarray(y_true, dtype=np.float64).reshape(-1)
        values = np.asarray(y_pred_or_proba, dtype=np.float64).reshape(len(truth), -1)[:, 0]
        mse = float(np.mean((truth - values) ** 2))
        total = float(np.sum((truth - truth.mean()) ** 2))
        residual = float(np.sum((truth - values) ** 2))
        r2 = (1.0 if residual == 0 else 0.0) if total == 0 else 1.0 - residual / total
        return {
            "mse": mse,
            "rmse": mse**0.5,
            "mae": float(np.mean(np.abs(truth - values))),
            "r2": r2,
        }
    n_classes = len(classes)
    y = np.asarray(y_true, dtype=np.int64)
    pred, proba = _split_outputs(y_pred_or_proba, n_classes)
    labels = list(range(n_classes))
    result = {"accuracy": float(np.mean(pred == y))}
    if n_classes == 2:
        positive = POSITIVE
        p, r, f, _ = skm.precision_recall_fscore_support(
            y, pred, labels=labels, pos_label=positive, average="binary", zero_division=0
        )
        result.update(precision=float(p), recall=float(r), f1=float(f))
        if proba is not None and 0 < int((y == positive).sum()) < len(y):
            result["roc_auc"] = float(skm.roc_auc_score(y == positive, proba[:, positive]))
            result["pr_auc"] = float(skm.average_precision_score(y == positive, proba[:, positive]))
    else:
        p, r, f, _ = skm.precision_recall_fscore_support(
            y, pred, labels=labels, average="macro", zero_division=0
        )
        result.update(precision=float(p), recall=float(r), f1=float(f))
        if proba is not None:
            for name, score in (
                ("roc_auc", skm.roc_auc_score),
                ("pr_auc", skm.average_precision_score),
            ):
                value = _ovr_average(y, proba, score)
                if np.isfinite(value):
                    result[name] = value
    minority = minority_class(y, n_classes)
    is_minority = y == minority
    result["minority_recall"] = float(np.mean(pred[is_minority] == minority))
    return result


def confusion(
    y_true: npt.ArrayLike, y_pred_or_proba: npt.ArrayLike, classes: Sequence[str]
) -> tuple[list[str], list[list[int]]]:
    """``(labels, matrix[true][predicted])`` over every class, present or not."""
    pred, _ = _split_outputs(y_pred_or_proba, len(classes))
    matrix = skm.confusion_matrix(
        np.asarray(y_true, dtype=np.int64), pred, labels=list(range(len(classes)))
    )
    return [str(c) for c in classes], [[int(v) for v in row] for row in matrix]


def roc_points(
    y_true: npt.ArrayLike, proba: npt.ArrayLike, *, positive: int | None = None
) -> tuple[list[float], list[float], list[float]]:
    """Binary ROC curve ``(fpr, tpr, thresholds)`` of the positive class (default: the
    last), at most :data:`ROC_MAX_POINTS` points; the first threshold is 1.0, not infinity."""
    y = np.asarray(y_true, dtype=np.int64)
    scores = np.asarray(proba, dtype=np.float64)
    pos = POSITIVE if positive is None else positive
    fpr, tpr, thresholds = skm.roc_curve(y == pos, scores[:, pos])
    if len(fpr) > ROC_MAX_POINTS:
        keep = np.unique(np.linspace(0, len(fpr) - 1, ROC_MAX_POINTS).round().astype(int))
        fpr, tpr, thresholds = fpr[keep], tpr[keep], thresholds[keep]
    return (
        [float(v) for v in fpr],
        [float(v) for v in tpr],
        [float(min(v, 1.0)) for v in thresholds],
    )


# --- gates -------------------------------------------------------------------------------


def format_value(value: float) -> str:
    return f"{value:.4g}"


def check_gates(
    gates: Sequence[Gate], metrics: Mapping[str, float], task: str, *, ranked: bool = False
) -> tuple[bool, list[dict[str, Any]]]:
    """Every gate against ``metrics``: ``(all passed, one result per gate)``. A gate on a metric
    this task does not produce (``ranked``: see :func:`available_metrics`) raises StepError
    naming ``evaluation.gates[i].metric``; a gate on a metric that could not be computed on
    this data (e.g. roc_auc with one class) fails."""
    allowed = available_metrics(task, ranked=ranked)
    results: list[dict[str, Any]] = []
    for i, gate in enumerate(gates):
        if gate.metric not in allowed:
            raise StepError(
                f"evaluation.gates[{i}].metric={gate.metric!r} is not produced for a {task} "
                f"task; expected one of {', '.join(allowed)}",
                field=f"evaluation.gates[{i}].metric",
            )
        if gate.op not in OPS:
            raise StepError(
                f"evaluation.gates[{i}].op={gate.op!r} is not a comparison; expected one of "
                f"{', '.join(OPS)}",
                field=f"evaluation.gates[{i}].op",
            )
        actual = metrics.get(gate.metric)
        measured = actual is not None and bool(np.isfinite(actual))
        passed = measured and bool(OPS[gate.op](float(actual or 0.0), float(gate.value)))
        shown = format_value(float(actual)) if measured and actual is not None else "n/a"
        text = f"{gate.metric}={shown}{gate.op}{format_value(gate.value)} {'✓' if passed else '✗'}"
        results.append(
            {
                "metric": gate.metric,
                "op": gate.op,
                "threshold": float(gate.value),
                "actual": float(actual) if measured and actual is not None else None,
                "passed": passed,
                "text": text if measured else f"{text} (not measurable on this data)",
            }
        )
    return all(r["passed"] for r in results), results


def gate_summary(results: Sequence[Mapping[str, Any]]) -> str:
    """``"f1=0.97>=0.9 ✓ latency_ms=1.2<5 ✓"`` (or a note that there are no gates)."""
    return " ".join(str(r["text"]) for r in results) or "no gates"


# --- learning curves ---------------------------------------------------------------------


def loss_curves(history: Any) -> tuple[list[float], list[float]]:
    """Train and validation losses per epoch from a history: a mapping of lists
    (``train_loss``/``val_loss``, or ``validation_loss``/``loss``) or a list of per-epoch
    mappings with those keys. Missing values become NaN."""
    train_keys = ("train_loss", "loss", "trainLoss")
    val_keys = ("val_loss", "validation_loss", "valLoss", "validationLoss")
    if isinstance(history, Mapping) and "epochs" in history:
        history = history["epochs"]

    def pick(source: Mapping[str, Any], keys: Sequence[str]) -> Any:
        return next((source[k] for k in keys if k in source), None)

    if isinstance(history, Mapping):
        tr, va = pick(history, train_keys) or [], pick(history, val_keys) or []
    else:
        rows = [r for r in history or [] if isinstance(r, Mapping)]
        tr, va = [pick(r, train_keys) for r in rows], [pick(r, val_keys) for r in rows]

    def floats(values: Sequence[Any]) -> list[float]:
        return [float("nan") if v is None else float(v) for v in values]

    return floats(tr), floats(va)


def learning_curve_verdict(history: Any, *, baseline_loss: float | None = None) -> tuple[str, str]:
    """``("overfit" | "underfit" | "good fit", explanation)`` from per-epoch losses.

    ``tr``/``va`` are the train/validation losses, ``b`` the epoch of the lowest ``va`` and
    ``k`` the epoch whose weights the model holds: the history's ``best_epoch`` when early
    stopping restored one, else the last. Rules, first match wins:

    1. fewer than 3 epochs with both losses: underfit (too few epochs to converge or judge);
    2. overfit: at ``k``, ``va`` is more than 10% above its minimum while ``tr`` kept falling
       after ``b``; or at ``k`` the gap ``va - tr`` exceeds 0.1 with ``va >= 2 x tr``;
    3. underfit: ``tr`` fell by less than 10% of its first value (flat); or ``tr`` at ``k`` is
       at least 80% of ``baseline_loss`` (the loss of guessing, e.g. ln(classes), when given);
       or ``k`` is the last epoch and both losses still fell by more than 5% over the last
       quarter of the epochs (stopped before converging);
    4. otherwise a good fit.
    """
    tr_all, va_all = loss_curves(history)
    pairs = [(t, v) for t, v in zip(tr_all, va_all, strict=False) if np.isfinite([t, v]).all()]
    if len(pairs) < MIN_EPOCHS:
        return "underfit", (
            f"only {len(pairs)} epoch(s) with train and validation loss: too few to converge "
            "or to judge the fit; train for more epochs"
        )
    tr = np.array([p[0] for p in pairs])
    va = np.array([p[1] for p in pairs])
    n, best = len(va), int(np.argmin(va))
    restored = history.get("best_epoch") if isinstance(history, Mapping) else None
    k = int(restored) - 1 if isinstance(restored, int) and 1 <= restored <= n else n - 1
    eps = 1e-12
    rise = (va[k] - va[best]) / max(abs(va[best]), eps)
    if k > best and rise > RISE_TOLERANCE and tr[k] < tr[best]:
        return "overfit", (
            f"validation loss rose from its minimum {va[best]:.4g} (epoch {best + 1}) to "
            f"{va[k]:.4g} (+{rise:.0%}) at epoch {k + 1} while the training loss kept falling "
            f"({tr[best]:.4g} → {tr[k]:.4g}); stop earlier (early stopping), regularise more "
            "or add data"
        )
    gap = va[k] - tr[k]
    if gap > GAP_ABSOLUTE and va[k] >= GAP_RATIO * tr[k]:
        return "overfit", (
            f"validation loss {va[k]:.4g} is {va[k] / max(tr[k], eps):.1f}x the training loss "
            f"{tr[k]:.4g} (epoch {k + 1}): the model fits the training rows much better than "
            "unseen ones; regularise more or add data"
        )
    improvement = (tr[0] - tr.min()) / max(abs(tr[0]), eps)
    if improvement < FLAT_IMPROVEMENT:
        return "underfit", (
            f"training loss barely moved ({tr[0]:.4g} → {tr.min():.4g}, -{improvement:.0%}): "
            "the model is not learning; raise the learning rate, the capacity or the epochs"
        )
    if baseline_loss is not None and tr[k] >= HIGH_LOSS * baseline_loss:
        return "underfit", (
            f"training loss {tr[k]:.4g} is close to the loss of guessing ({baseline_loss:.4g}): "
            "the model is too small or under-trained"
        )
    quarter = max(n // 4, 1)
    tr_drop = (tr[-quarter - 1] - tr[-1]) / max(abs(tr[-quarter - 1]), eps)
    va_drop = (va[-quarter - 1] - va[-1]) / max(abs(va[-quarter - 1]), eps)
    if k == n - 1 and tr_drop > STILL_FALLING and va_drop > STILL_FALLING:
        return "underfit", (
            f"both losses were still falling over the last {quarter} epoch(s) (train "
            f"-{tr_drop:.0%}, validation -{va_drop:.0%}): training stopped before converging; "
            "train for more epochs"
        )
    note = (
        f"; validation loss rose afterwards (to {va[-1]:.4g} at epoch {n}) and early stopping "
        f"kept the epoch-{k + 1} weights"
        if k < n - 1 and va[-1] > va[k]
        else ""
    )
    return "good fit", (
        f"validation loss reached its minimum {va[best]:.4g} at epoch {best + 1} of {n}; the "
        f"model holds epoch {k + 1} (train {tr[k]:.4g}, validation {va[k]:.4g}, gap "
        f"{gap:.4g}){note}"
    )


# --- serving cost ------------------------------------------------------------------------


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` intra-op threads (None: leave torch's setting)."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def median_latency_ms(
    call: Any, batch: Any, *, warmup: int = 5, repeats: int = 30, threads: int | None = 1
) -> float:
    """Median wall time of ``call(batch)`` in milliseconds after ``warmup`` calls, on
    ``threads`` intra-op threads: one by default, so that the figure measures the model, not
    how busy the other cores are (a parallel region waits for its slowest thread)."""
    import torch

    times = []
    with torch_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            call(batch)
        for _ in range(repeats):
            start = time.perf_counter()
            call(batch)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def serving_cost(
    model: LoadedModel, model_dir: str | Path, rows: npt.ArrayLike, *, batch: int = SERVING_BATCH
) -> dict[str, float]:
    """``latency_ms`` (median ``predict`` time of ``batch`` raw rows, cycled from ``rows``) and
    ``size_mb`` (``model.pt2`` in MB) of the exported artifact."""
    data = np.asarray(rows, dtype=np.float32)
    batch_rows = data[np.arange(batch) % len(data)]
    return {
        "latency_ms": median_latency_ms(model.predict, batch_rows),
        "size_mb": model_size_bytes(Path(model_dir)) / 1e6,
    }


# --- plots and the HTML report -----------------------------------------------------------


def new_figure(width: float = 5.0, height: float = 4.0, ncols: int = 1) -> tuple[Any, Any]:
    """A matplotlib figure on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, height))


def figure_png(fig: Any) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def plot_confusion(labels: Sequence[str], matrix: Sequence[Sequence[int]]) -> bytes:
    size = min(3.0 + 0.45 * len(labels), 10.0)
    fig, ax = new_figure(size, size)
    data = np.asarray(matrix)
    ax.imshow(data, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(labels) <= 20:
        for (i, j), value in np.ndenumerate(data):
            colour = "white" if value > data.max() / 2 else "black"
            ax.text(j, i, str(value), ha="center", va="center", color=colour, fontsize=8)
    ax.set_title("Confusion matrix (test)")
    return figure_png(fig)


def plot_roc_pr(y_true: npt.ArrayLike, proba: npt.ArrayLike, classes: Sequence[str]) -> bytes:
    """ROC and precision-recall curves: the positive (last) class for binary tasks, one
    curve per class (one-vs-rest, at most 10) for more."""
    y = np.asarray(y_true, dtype=np.int64)
    scores = np.asarray(proba, dtype=np.float64)
    fig, (roc_ax, pr_ax) = new_figure(10.0, 4.0, ncols=2)
    shown = [POSITIVE] if len(classes) == 2 else list(range(len(classes)))[:10]
    for c in shown:
        truth = y == c
        if not 0 < int(truth.sum()) < len(y):
            continue
        fpr, tpr, _ = skm.roc_curve(truth, scores[:, c])
        precision, recall, _ = skm.precision_recall_curve(truth, scores[:, c])
        roc_ax.plot(fpr, tpr, label=f"{classes[c]} (AUC {skm.auc(fpr, tpr):.3f})")
        pr_ax.plot(recall, precision, label=f"{classes[c]}")
    roc_ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test)")
    pr_ax.set(xlabel="recall", ylabel="precision", title="Precision-recall (test)")
    for ax in (roc_ax, pr_ax):
        ax.legend(fontsize=7, loc="lower right" if ax is roc_ax else "lower left")
    return figure_png(fig)


def plot_learning_curves(history: Any, verdict: str = "") -> bytes:
    tr, va = loss_curves(history)
    fig, ax = new_figure(6.0, 4.0)
    ax.plot(range(1, len(tr) + 1), tr, marker=".", label="train loss")
    ax.plot(range(1, len(va) + 1), va, marker=".", label="validation loss")
    ax.set(xlabel="epoch", ylabel="loss", title=f"Learning curves {verdict and f'({verdict})'}")
    ax.legend()
    return figure_png(fig)


STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;"
    "text-align:left}th{background:#f3f3f3}.pass{color:#1a7f37}.fail{color:#cf222e}"
    "img{max-width:100%;margin:.5em 0}"
)


def png_tag(png: bytes, alt: str) -> str:
    """An ``<img>`` with the PNG inlined (base64), so the report is one self-contained file."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return format_value(value)
        return html.escape(str(value))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def html_page(title: str, sections: Sequence[tuple[str, str]]) -> str:
    """A complete HTML document: ``sections`` are ``(heading, inner HTML)``."""
    parts = [f"<h2>{html.escape(h)}</h2>\n{body}" for h, body in sections]
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )


def evaluation_report(
    *,
    metrics: Mapping[str, float],
    gates: Sequence[Mapping[str, Any]],
    passed: bool,
    verdict: tuple[str, str] | None,
    plots: Mapping[str, bytes],
) -> str:
    """The evaluation report: metric table, gate table, verdict and the plots, one file."""
    verdict_html = (
        f"<p><b>{html.escape(verdict[0])}</b>: {html.escape(verdict[1])}</p>"
        if verdict
        else "<p>No learning curves were recorded.</p>"
    )
    outcome = (
        '<p class="pass">all gates passed</p>' if passed else '<p class="fail">gates failed</p>'
    )
    gate_rows = [
        [g["metric"], g["op"], g["threshold"], "n/a" if g["actual"] is None else g["actual"],
         "✓" if g["passed"] else "✗"]
        for g in gates
    ]  # fmt: skip
    sections = [
        ("Metrics (test split)", html_table(["metric", "value"], sorted(metrics.items()))),
        (
            "Gates",
            (html_table(["metric", "op", "threshold", "actual", "passed"], gate_rows) + outcome)
            if gates
            else "<p>No gates: the model is registered whatever its metrics.</p>",
        ),
        ("Learning curves", verdict_html),
        ("Plots", "\n".join(png_tag(png, name) for name, png in plots.items())),
    ]
    return html_page("Evaluation", sections)
