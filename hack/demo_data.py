"""The world of the closed-loop demo (`make demo`): card payments, before and after a shift.

Each row is one card payment, six numeric features and the label ``is_fraud`` (0/1):

====================  =============================================  ==================
feature               what                                           after the shift
====================  =============================================  ==================
``amount``            payment amount (log-normal, median ~80)         smaller (~35)
``distance_km``       distance from the card's home (log-normal)      farther (~3x)
``txn_per_hour``      the card's recent payment rate (gamma)          higher
``hour_of_day``       local time, 0..24 (peaks mid-afternoon)         unchanged
``account_age_days``  age of the account (log-normal, median ~400)    unchanged
``merchant_risk``     the merchant's risk score, 0..1 (beta(2, 5))    unchanged
====================  =============================================  ==================

``regime="before"``: fraud is large payments far from home, at risky merchants, from young
accounts, at night (~26 % positives). ``regime="after"``: travel season and a card-testing ring
at once. Travellers pay far from home, so distance no longer says fraud; the ring runs bursts of
*small* test charges, so the effect of ``amount`` flips and ``txn_per_hour`` starts to matter
(~40 % positives). Merchant risk, account age and the hour keep their effect. So both the input
distribution (three features) and the relation between inputs and label move: a model trained
before the shift is at chance on ``after`` rows, one retrained on a few thousand ``after`` rows
(the labelled rows the serving runtime logs, ``data.format: requestLog``) is as good as the
first one was before.

The label is drawn from a logistic model of standardised log-scale features, so even the true
relation leaves ~8 % of the rows on the wrong side: accuracy ~0.92 is the ceiling in both
regimes. ``is_fraud`` is 0/1, so the artifact's classes are ``["0", "1"]`` (positive class
``"1"``, last, as the pipeline's binary metrics expect) and a label fed back to the runtime
(``POST .../feedback {"id", "label"}``) may be the class index or its name, which coincide.

API: :func:`generate` (a seeded table), :func:`write_training_csv`, :func:`traffic` (request
batches with their labels), :func:`evaluate` (a registered artifact loaded as the serving runtime
loads it, scored on a table), :func:`training_spec` (a TrainingRun ``spec`` that trains in
seconds). ``python -m hack.demo_data measure`` reruns the measurement below with the local
executor (``kfp.local``, no API server).

Measured 2026-12-01 (``python -m hack.demo_data measure``, seeds 1, 2, 3; a 2-core machine
shared with other work; local executor). "old" trained on 4000 ``before`` rows, "new" on 3000
``after`` rows; both scored with :func:`evaluate` on 2000 fresh rows of each regime:

    ============================  ===================  ===================  ===================
    seed                          1                    2                    3
    ============================  ===================  ===================  ===================
    old: run / train step (s)     20.9 / 6.6           23.4 / 7.1           37.8 / 14.8 (busy)
    new: run / train step (s)     23.6 / 7.6           27.7 / 10.3          34.3 / 12.9 (busy)
    old on before: acc / F1       0.902 / 0.809        0.903 / 0.802        0.906 / 0.825
    old on after:  acc / F1       0.542 / 0.294        0.537 / 0.292        0.568 / 0.334
    new on after:  acc / F1       0.901 / 0.877        0.914 / 0.890        0.896 / 0.864
    new on before: acc / F1       0.700 / 0.099        0.710 / 0.082        0.703 / 0.075
    pipeline test acc old / new   0.900 / 0.896        0.900 / 0.873        0.922 / 0.882
    ============================  ===================  ===================  ===================

So after the shift the old model falls from ~0.90 to ~0.55 accuracy (F1 ~0.8 to ~0.3) and the
retrained one is +0.33..0.38 accuracy and +0.53..0.60 F1 above it on post-shift data; both pass
the accuracy >= 0.75 gate. A run is ~21-28 s end to end (ingest, preprocess, train, evaluate,
register; evaluate's latency measurement is ~5 s of it), up to ~38 s when the cores are busy.

PSI of 2000 ``after`` rows against the 4000 training rows' 10 quantile buckets (seeds 1/2/3):
amount 1.03/0.98/1.12, distance_km 1.39/1.16/1.40, txn_per_hour 0.96/0.98/0.97, hour_of_day
0.013/0.004/0.007, account_age_days 0.007/0.008/0.012, merchant_risk 0.009/0.009/0.015. At 300
served rows the shifted ones are 0.84..1.59 and the unshifted ones 0.01..0.09 (sampling noise).

The retrain path itself (seed 1): the old model served by the runtime's ``Predictor`` with a
request log, 3000 ``after`` rows sent in batches of 8 with their labels fed back, then
:func:`training_spec` with ``data_format="requestLog"`` on that log: 35 s, accuracy 0.901 and
F1 0.874 on fresh ``after`` rows (the old one: 0.542 / 0.294). Mixing the template's
``before`` rows in (``action.data: both``) costs the new model some accuracy on ``after``
(a scikit-learn MLP of the same size: ~0.84 instead of ~0.90), still far above the old one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

Regime = Literal["before", "after"]
REGIMES: Final = ("before", "after")
FEATURES: Final = (
    "amount",
    "distance_km",
    "txn_per_hour",
    "hour_of_day",
    "account_age_days",
    "merchant_risk",
)
SHIFTED: Final = ("amount", "distance_km", "txn_per_hour")
TARGET: Final = "is_fraud"
CLASSES: Final = ("0", "1")  # the artifact's classes; "1" (fraud) is the positive class
POSITIVE: Final = "1"
GATE_ACCURACY: Final = 0.75


@dataclass(frozen=True)
class World:
    """One regime: the feature distributions and the label's logistic model (coefficients on
    features standardised against the ``before`` distributions)."""

    log_amount: tuple[float, float]  # mean, std of ln(amount)
    log_distance: tuple[float, float]  # mean, std of ln(distance_km)
    rate_shape: float  # txn_per_hour ~ gamma(shape, 1)
    amount: float
    distance: float
    rate: float
    bias: float


# The unshifted features' distributions and effects, shared by both regimes.
LOG_AGE: Final = (np.log(400.0), 1.0)
RISK_BETA: Final = (2.0, 5.0)
HOUR: Final = (14.0, 4.5)  # mean, std of the hour before wrapping at 24
RISK_EFFECT, AGE_EFFECT, NIGHT_EFFECT = 1.6, -1.2, 0.8
SHARPNESS: Final = 1.5  # scales the whole logit: higher, fewer rows on the wrong side

WORLDS: Final[dict[str, World]] = {
    "before": World(
        log_amount=(np.log(80.0), 0.7),
        log_distance=(np.log(12.0), 0.9),
        rate_shape=2.0,
        amount=2.2,
        distance=1.8,
        rate=0.0,
        bias=-2.0,
    ),
    "after": World(
        log_amount=(np.log(35.0), 0.8),
        log_distance=(np.log(36.0), 0.9),
        rate_shape=3.5,
        amount=-2.2,  # card testing: small charges are the fraud now
        distance=0.0,  # travel season: far from home is normal
        rate=1.8,
        bias=-5.0,
    ),
}


def generate(regime: Regime, rows: int, seed: int) -> pd.DataFrame:
    """``rows`` payments of ``regime``: the columns of :data:`FEATURES`, then ``is_fraud``.
    The same (regime, rows, seed) gives the same table; the two regimes draw from independent
    streams even with one seed."""
    if regime not in WORLDS:
        raise ValueError(f"regime={regime!r}: expected one of {', '.join(REGIMES)}")
    if rows < 1:
        raise ValueError(f"rows={rows}: expected at least 1")
    world = WORLDS[regime]
    ref = WORLDS["before"]
    rng = np.random.default_rng([seed, REGIMES.index(regime)])
    log_amount = rng.normal(*world.log_amount, rows)
    log_distance = rng.normal(*world.log_distance, rows)
    rate = rng.gamma(world.rate_shape, 1.0, rows)
    hour = rng.normal(*HOUR, rows) % 24.0
    log_age = rng.normal(*LOG_AGE, rows)
    risk = rng.beta(*RISK_BETA, rows)

    a, b = RISK_BETA
    risk_std = np.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
    logit = (
        world.amount * (log_amount - ref.log_amount[0]) / ref.log_amount[1]
        + world.distance * (log_distance - ref.log_distance[0]) / ref.log_distance[1]
        + world.rate * (rate - ref.rate_shape) / np.sqrt(ref.rate_shape)
        + RISK_EFFECT * (risk - a / (a + b)) / risk_std
        + AGE_EFFECT * (log_age - LOG_AGE[0]) / LOG_AGE[1]
        + NIGHT_EFFECT * np.cos((hour - 3.0) / 24.0 * 2 * np.pi)  # highest at 3 am
        + world.bias
    )
    fraud = rng.random(rows) < 1.0 / (1.0 + np.exp(-SHARPNESS * logit))
    return pd.DataFrame(
        {
            "amount": np.round(np.exp(log_amount), 2),
            "distance_km": np.round(np.exp(log_distance), 3),
            "txn_per_hour": np.round(rate, 4),
            "hour_of_day": np.round(hour, 4),
            "account_age_days": np.round(np.exp(log_age), 2),
            "merchant_risk": np.round(risk, 5),
            TARGET: fraud.astype(np.int64),
        }
    )


def write_training_csv(path: str | Path, rows: int, seed: int, regime: Regime = "before") -> Path:
    """:func:`generate` written as CSV (header, no index) at ``path``; returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    generate(regime, rows, seed).to_csv(target, index=False)
    return target


def traffic(
    regime: Regime, *, seed: int, batch_size: int = 8, batches: int | None = None
) -> Iterator[tuple[list[list[float]], list[int]]]:
    """Request batches of ``regime``: (rows in :data:`FEATURES` order, as a V1/V2 body takes
    them; their labels 0/1, what to feed back per row). Endless unless ``batches`` is given;
    seeded, one fresh stream per 1024 rows."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected at least 1")
    chunk, block = 0, max(1024 // batch_size, 1) * batch_size
    sent = 0
    while batches is None or sent < batches:
        frame = generate(regime, block, seed * 1_000_003 + chunk)
        chunk += 1
        for start in range(0, block, batch_size):
            if batches is not None and sent >= batches:
                return
            part = frame.iloc[start : start + batch_size]
            yield part[list(FEATURES)].to_numpy(np.float64).tolist(), part[TARGET].tolist()
            sent += 1


def _model_dir(model: str | Path) -> Path:
    text = str(model)
    if text.startswith("file://"):
        return Path(text.removeprefix("file://"))
    if "://" in text:
        raise ValueError(f"model={text!r}: expected a local directory or a file:// URI")
    return Path(text)


def evaluate(model: str | Path, frame: pd.DataFrame) -> dict[str, float]:
    """Accuracy and F1 of fraud (class "1") of a registered artifact (its directory or its
    ``file://`` URI, as ``ModelVersion.spec.artifact.uri`` has it) on ``frame``. The artifact
    is loaded by the serving runtime's own loader (``launcher.load_predictor``) and fed the
    raw rows in the artifact's feature order, as a request would be."""
    from kubeloop.serving.launcher import load_predictor
    from kubeloop.serving.predictor import ServingOptions

    directory = _model_dir(model)
    predictor = load_predictor("demo-evaluate", directory.parent.name, directory, ServingOptions())
    loaded = predictor.model
    missing = [f for f in loaded.features if f not in frame.columns]
    if missing or TARGET not in frame.columns:
        raise ValueError(
            f"frame lacks columns {[*missing, *([TARGET] if TARGET not in frame else [])]}; "
            f"the model reads {loaded.features} and the label is {TARGET!r}"
        )
    proba = loaded.predict(frame[list(loaded.features)].to_numpy(np.float32))
    predicted = np.asarray(loaded.classes)[proba.argmax(axis=1)]
    return scores(frame[TARGET].map(str).to_numpy(), predicted)


def scores(truth: npt.ArrayLike, predicted: npt.ArrayLike) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of the positive class, labels as class names."""
    y = np.asarray(truth).astype(str) == POSITIVE
    p = np.asarray(predicted).astype(str) == POSITIVE
    tp, fp, fn = int(np.sum(y & p)), int(np.sum(~y & p)), int(np.sum(y & ~p))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": float(np.mean(y == p)),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "rows": float(len(y)),
    }


def training_spec(
    data_uri: str, model_name: str, alias: str | None = "candidate", *, data_format: str = "auto"
) -> dict[str, Any]:
    """The ``spec`` of a TrainingRun for this world: a small MLP, no tuning, explanation or
    optimisation, gated on test accuracy >= :data:`GATE_ACCURACY`; trains in seconds on two
    cores. ``data_format="requestLog"`` when ``data_uri`` is a deployment's request log."""
    return {
        "data": {
            "uri": data_uri,
            "format": data_format,
            "target": TARGET,
            "task": "classification",
            "split": {"validation": 0.15, "test": 0.15, "stratify": True, "seed": 7},
        },
        "preprocessing": {
            "missing": {"strategy": "median"},
            "outliers": {"method": "none"},
            "scaling": "standard",
            "qualityGate": {"maxMissingFraction": 0.2, "minRows": 500},
        },
        "model": {
            "family": "mlp",
            "hiddenLayers": [32, 16],
            "dropout": 0.05,
            "epochs": 15,
            "batchSize": 128,
            "learningRate": 0.003,
            "earlyStopping": {"patience": 4},
        },
        "evaluation": {
            "gates": [{"metric": "accuracy", "op": ">=", "value": GATE_ACCURACY}],
            "learningCurves": False,
        },
        "explanation": {"method": "none"},
        "resources": {"cpu": "2", "memory": "2Gi", "gpu": 0},
        "registration": {"modelName": model_name, "alias": alias},
        "retries": 0,
        "timeout": "10m",
    }


# --- the measurement behind the numbers in the module docstring -------------------------------

TRAIN_ROWS: Final = {"before": 4000, "after": 3000}
HELD_OUT_ROWS: Final = 2000


@dataclass(frozen=True)
class Trained:
    """One TrainingRun of :func:`training_spec`, run by the local executor."""

    model_uri: str  # ModelVersion.spec.artifact.uri
    seconds: float  # submit to Succeeded, as observed
    steps: dict[str, float]  # seconds per step, from the step records
    test_metrics: dict[str, float]  # the pipeline's own test split


def _step_seconds(run_dir: Path) -> dict[str, float]:
    from datetime import datetime

    from kubeloop_pipelines.progress import read_steps

    out = {}
    for step, record in read_steps(run_dir).items():
        started, finished = record.get("startedAt"), record.get("finishedAt")
        if started and finished:
            span = datetime.fromisoformat(finished) - datetime.fromisoformat(started)
            out[step] = round(span.total_seconds(), 1)
    return out


async def train_locally(root: Path, name: str, data_uri: str) -> Trained:
    """Compile :func:`training_spec` for ``data_uri`` and run it with ``LocalExecutor`` (the
    operator's local executor: ``kfp.local`` in a detached runner); no API server needed."""
    from kubeloop.api.training_run import TrainingRunSpec
    from kubeloop.backends.executor import Submission
    from kubeloop.backends.executor_local import LocalExecutor
    from kubeloop.contract.steps import MANIFEST_FILE
    from kubeloop_pipelines.compiler import compile_spec

    spec = TrainingRunSpec.model_validate(training_spec(data_uri, name, "candidate"))
    compiled = compile_spec(spec)
    executor = LocalExecutor(root / "state")
    run_dir = root / "artifacts" / "demo" / name / "attempt-1"
    uri = f"file://{run_dir}"
    sub = Submission(
        namespace="demo", name=name, attempt=1, ir_yaml=compiled.ir_yaml,
        spec_hash=compiled.spec_hash, run_uri=uri, arguments={"run_uri": uri}, timeout_s=300,
    )  # fmt: skip
    started = time.monotonic()
    run_id = await executor.submit(sub)
    seen = await executor.observe("demo", name, 1, run_id)
    while seen.state not in ("Succeeded", "Failed", "Unknown"):
        await asyncio.sleep(0.25)
        seen = await executor.observe("demo", name, 1, run_id)
    seconds = time.monotonic() - started
    if seen.state != "Succeeded":
        raise RuntimeError(f"{name}: {seen.state} {seen.message}\n{seen.log_tail}")
    manifest = json.loads((run_dir / MANIFEST_FILE).read_text())["spec"]
    return Trained(
        model_uri=manifest["artifact"]["uri"],
        seconds=round(seconds, 1),
        steps=_step_seconds(run_dir),
        test_metrics={k: round(v, 3) for k, v in manifest["metrics"].items()},
    )


def feature_psi(reference: pd.DataFrame, served: pd.DataFrame) -> dict[str, float]:
    """PSI of each feature of ``served`` against ``reference``'s 10 quantile buckets, as the
    ModelVersion reference and the DriftPolicy compute it."""
    from kubeloop.contract.reference import histogram, quantile_edges
    from kubeloop.planning.drift import compare

    out = {}
    for name in FEATURES:
        ref = histogram(reference[name].to_numpy(), quantile_edges(reference[name].to_numpy()))
        counts = np.asarray(histogram(served[name].to_numpy(), ref["edges"])["fractions"])
        verdict = compare(ref["fractions"], list(counts * len(served)), statistic="psi")
        out[name] = round(float(verdict.value or 0.0), 3)
    return out


async def measure(seed: int, root: Path) -> dict[str, Any]:
    """Train on ``before`` and on ``after`` rows (seeded from ``seed``), score both on fresh
    held-out rows of both regimes; the PSI of 300 and 2000 served ``after`` rows."""
    before_csv = write_training_csv(root / "before.csv", TRAIN_ROWS["before"], seed)
    after_csv = write_training_csv(root / "after.csv", TRAIN_ROWS["after"], seed + 1, "after")
    old = await train_locally(root, f"old-{seed}", f"file://{before_csv}")
    new = await train_locally(root, f"new-{seed}", f"file://{after_csv}")
    held_out = {r: generate(r, HELD_OUT_ROWS, seed + 2) for r in REGIMES}
    reference = generate("before", TRAIN_ROWS["before"], seed)
    return {
        "seed": seed,
        "positives": {r: round(float(held_out[r][TARGET].mean()), 3) for r in REGIMES},
        "old": {"seconds": old.seconds, "steps": old.steps, "test": old.test_metrics},
        "new": {"seconds": new.seconds, "steps": new.steps, "test": new.test_metrics},
        "old_on_before": _rounded(evaluate(old.model_uri, held_out["before"])),
        "old_on_after": _rounded(evaluate(old.model_uri, held_out["after"])),
        "new_on_after": _rounded(evaluate(new.model_uri, held_out["after"])),
        "new_on_before": _rounded(evaluate(new.model_uri, held_out["before"])),
        "psi_300": feature_psi(reference, generate("after", 300, seed + 3)),
        "psi_2000": feature_psi(reference, generate("after", 2000, seed + 3)),
    }


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in values.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hack.demo_data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("measure", help="train both models locally and score them")
    run.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    run.add_argument("--root", type=Path, default=None, help="work directory (default: a temp)")
    csv_cmd = commands.add_parser("csv", help="write a training CSV")
    csv_cmd.add_argument("path", type=Path)
    csv_cmd.add_argument("--rows", type=int, default=TRAIN_ROWS["before"])
    csv_cmd.add_argument("--seed", type=int, default=1)
    csv_cmd.add_argument("--regime", choices=REGIMES, default="before")
    args = parser.parse_args(argv)
    if args.command == "csv":
        print(write_training_csv(args.path, args.rows, args.seed, args.regime))
        return 0
    root = args.root or Path(tempfile.mkdtemp(prefix="demo-data-"))
    for seed in args.seeds:
        result = asyncio.run(measure(seed, root / f"seed-{seed}"))
        print(json.dumps(result, indent=None, sort_keys=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
