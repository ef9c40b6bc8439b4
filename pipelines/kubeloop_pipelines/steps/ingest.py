"""Ingest: read the data ``spec.data`` points at (``data.uri``, then each ``data.extra`` source
appended), check it against the spec, split it and write the raw-dataset layout
(``train/validation/test.parquet`` + ``schema.json``, see contract.py).

Rows without a target value cannot be learned from or scored, so they are dropped here (and
counted in the metrics: for a request log, the requests no label came for); everything else is
left for preprocess to clean.
"""

from __future__ import annotations

from pathlib import Path

from kubeloop.api.training_run import TrainingRunSpec
from kubeloop_pipelines.contract import SCHEMA_FILE, SPLITS, StepError, StepResult, write_json
from kubeloop_pipelines.ml import datasets
from kubeloop_pipelines.progress import StepReport


def run(
    spec: TrainingRunSpec, *, report: StepReport, run_uri: str, dataset_dir: Path
) -> StepResult:
    """Read, validate and split ``spec.data`` into ``dataset_dir``."""
    del run_uri  # ingest publishes nothing; the dataset itself is the step's artifact
    data = spec.data
    more = f" and {len(data.extra)} more source(s)" if data.extra else ""
    report.update(message=f"reading {data.uri}{more}", force=True)
    table = datasets.load_table(data)
    selected, main = table.frame, table.sources[0]
    n_read = len(selected)
    labelled = selected.loc[selected[data.target].notna()].reset_index(drop=True)
    if labelled.empty and data.format == "requestLog" and not main.rows and data.since:
        raise StepError(
            f"no row of the request log {data.uri} was served at or after "
            f"data.since={data.since}; move since earlier or wait for traffic",
            field="data.since",
        )
    if labelled.empty and data.format == "requestLog":
        window = f" served since {data.since}" if data.since else ""
        raise StepError(
            f"none of the {main.rows} logged rows{window} in {data.uri} has a label yet; feed "
            "labels back (POST .../feedback with the response's request id) before training "
            "on it",
            field="data.uri",
        )
    if labelled.empty:
        raise StepError(
            f"data.target={data.target!r} is empty in every one of the {n_read} rows of "
            f"{data.uri}{more}; point data.target at the column holding the labels",
            field="data.target",
        )
    schema = datasets.infer_schema(labelled, data)
    report.update(message=f"splitting {len(labelled)} rows ({schema.modality}, {schema.task})")
    parts = datasets.split(
        labelled,
        data.split,
        target=data.target,
        task=data.task,
        group_column=data.group_column or "",
    )
    # the digest covers every source's rows (the table they make, in order), so lineage's
    # datasetSha256 changes when an appended source does
    schema.sha256 = datasets.fingerprint(labelled)
    schema.rows = {name: len(parts[name]) for name in SPLITS} | {"total": len(labelled)}
    schema.sources = [source.to_json() for source in table.sources]

    dataset_dir.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        parts[name].to_parquet(dataset_dir / f"{name}.parquet", index=False)
    write_json(dataset_dir / SCHEMA_FILE, schema.to_json())
    report.update(
        message=f"{len(labelled)} rows, {len(schema.features)} features, "
        + ", ".join(f"{name} {len(parts[name])}" for name in SPLITS),
        force=True,
    )
    metrics = {
        "rows": float(len(labelled)),
        "columns": float(table.columns_read),
        "features": float(len(schema.features)),
        "rows_without_target": float(n_read - len(labelled)),
    }
    metrics |= {f"{name}_rows": float(len(parts[name])) for name in SPLITS}
    if data.extra:
        metrics["extra_rows"] = float(sum(source.labelled for source in table.sources[1:]))
    if schema.task == "classification":
        metrics["classes"] = float(len(schema.classes))
    return StepResult(
        metrics=metrics,
        outputs={
            "modality": schema.modality,
            "task": schema.task,
            "n_classes": len(schema.classes),
            "sha256": schema.sha256,
        },
    )
